"""Model files as content: chunk manifests (manifest.py) and the on-disk cache of fetched chunks (store.py).

serve/fetch.py moves the chunks between peers; this package knows files and hashes, not the network.
"""
