"""edgegw's benchmark suite: `python -m bench [relay|latency|sessions|sftp] [--quick]`.

See bench/README.md for what each part measures and how to reproduce a figure by hand."""
