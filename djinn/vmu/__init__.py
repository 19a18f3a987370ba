"""Memory virtualization: the Text segment (weights), uploads into it, and per-session accounting."""
