"""Segmentation methods: the built-in U-Net (patch model) and classical scikit-image methods."""
