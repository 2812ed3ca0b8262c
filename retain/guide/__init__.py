"""Choosing among retain's methods: rules from constraints (``retain recommend``) and a measured search
(``retain tune``).

``catalogue`` names the hybrids and the facts about each; ``rules`` turns constraints into a ranked list
with reasons; ``evidence`` carries the packaged benchmark table; ``template`` writes a run YAML with
placeholders; ``space`` reads the search space from the strategies' declared strengths; ``tune`` runs the
optuna search and ``tune_report`` writes its files.
"""
