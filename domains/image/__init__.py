"""Image domain: data loaders (``domains.image.datasets``) scaled to [-1, 1]; heavy stacks are imported lazily."""
