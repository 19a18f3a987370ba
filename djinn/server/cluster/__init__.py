"""Several workers behind one address (Note [One server, several workers] in front.py)."""
