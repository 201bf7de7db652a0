"""The shapes world: a text-to-image world with a ground-truth judge, where learning can be measured on a CPU."""
