"""Segmentation metrics against a reference (Dice, surface distances, NSD) and their conventions."""
