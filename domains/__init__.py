"""Domain packages built on energyflow; each imports its heavy stack lazily."""
