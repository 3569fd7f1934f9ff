"""Layer 2, zoo: populations of trained networks. Architectures and tasks, population training,
the raw zoo format on disk, import of zoos trained elsewhere, zoos as `datasets`."""
