"""The one test harness of mirrord's tests and benchmarks.

- lab: network namespaces, veth links, the daemon as a subprocess, status polling;
- stream: sequenced UDP streams and the capture that records their copies;
- capture: counting and recording what reaches a collector (pcap, tcpdump, receivers);
- wait: `wait_until`, the one way to wait for a state with a deadline;
- tzsp: probes and a worker runner that run inside a namespace (`python -m tests.harness.tzsp`).

The benchmarks (bench/) import these too, from the repository root.
"""
