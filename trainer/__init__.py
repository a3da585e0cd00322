"""DeepSpeed trainer (built in a later issue)."""
