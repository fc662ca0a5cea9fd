"""The fleet: instances, versions, deep health and golden checks, supervision, membership, and the Fleet of them."""
