"""The Flower layer: ClientApp, ServerApp and the round loop around the pure algorithms."""
