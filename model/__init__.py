"""Code shared by training, serving and batch scoring: network, text, ids, schemas."""
