"""lbd's kernel side: links and addresses (link.py, pyroute2) and nftables rules (nft.py).

Every module here changes the network namespace the daemon runs in, and nothing else.
"""
