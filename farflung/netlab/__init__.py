"""The network lab: emulate slow, heterogeneous links on one Linux machine with network
namespaces, veth pairs, a bridge and tc shaping (root needed). See docs/netlab.md."""

from farflung.netlab.housekeeping import (
    NS_PATTERN,
    PREFIX_PATTERN,
    NetlabError,
    available,
    list_labs,
    netlab_down,
)
from farflung.netlab.lab import MAX_HOSTS, Lab, in_netns
from farflung.netlab.throughput import (
    ThroughputResult,
    measure_duplex,
    measure_pairs,
    measure_throughput,
)

__all__ = [
    "MAX_HOSTS",
    "NS_PATTERN",
    "PREFIX_PATTERN",
    "Lab",
    "NetlabError",
    "ThroughputResult",
    "available",
    "in_netns",
    "list_labs",
    "measure_duplex",
    "measure_pairs",
    "measure_throughput",
    "netlab_down",
]
