"""What a round needs as plain Python, with no Flower import (a test enforces it): the
workspace, one client's round (its stages' client halves live with the stages), the settings
a client is sent, client-held state, faults, checkpoints, the privacy plan, client sampling
and the round's callbacks. ``fedpeft.federation`` wraps it in Flower's ClientApp/ServerApp,
grids and messages."""
