"""External systems of the model server: model files and weights (`loading.py`)."""
