"""Images and labels: reading and writing (SimpleITK), geometry, label values, intensity and grid preprocessing, synthetic phantoms."""
