"""Keys of fedpeft's message protocol shared by the server, the strategies and the ClientApp.

Kept free of heavy imports: a deployment ClientApp reads it before it knows whether a
message needs torch at all.
"""

#: train message config key naming the logical client the message is for
CLIENT_ID_KEY = "client-id"
