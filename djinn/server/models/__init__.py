"""Models the server builds itself: the allow-listed architectures, their weights bound to the Text
segment (registry, tensors), and models larger than their GPU budget streamed through a ring (streaming)."""
