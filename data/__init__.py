"""Dataset readers, image/text preprocessing and test fixtures."""
