"""Synthetic scenes with ground truth (the demo tabletop), rendered independently of our rasterizer."""
