"""lbd's test bed: real network namespaces, a cluster of real daemons, client load.

Everything ``lbd lab`` needs to run from an installed lbd, shared with the
namespace tests (tests/netns) and the benchmarks (bench/): the bed of namespaces
(bed.py, nsutil.py, traffic.py), the cluster harness (cluster.py), the programs that
run inside namespaces (``python -m lbd.testbed.echo_server``, ``client_probe``,
``load``, ``nft_agent``, ``peer_emulator``), the capture reading (pcap.py) and the
figures of a run (metrics.py), the cluster simulator (clustersim.py), and the
benchmarks' measuring code that their CI smoke tests call (failover_lab, keepalived_lab,
cost, flood, soak*): bench/X.py runs lbd.testbed.X's ``main``.
"""
