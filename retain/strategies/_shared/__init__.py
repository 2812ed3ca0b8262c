"""Helpers several strategies share (private: not strategies, not registered)."""
