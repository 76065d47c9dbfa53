"""Unit tier: parsing, rings, protocol codec and the blk backend, hostile input included."""
