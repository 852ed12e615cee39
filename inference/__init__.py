"""Model, selective scan, preprocessing, training and evaluation (usable without the node)."""
