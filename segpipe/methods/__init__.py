"""What runs on a tile: the method plan and its dispatch (segment), the classical methods, region growing,
model inference on workers (CPU or GPU), and training the built-in U-Net."""
