"""Front-ends: decoding, face detection and crops, log-mel, tokenization, pretrained CNNs."""
