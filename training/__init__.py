"""The dual-encoder model, its loss, the train loop and checkpoint save/load."""
