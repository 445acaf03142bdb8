"""The tests' one support layer: every helper function and class the test folders share.

`conftest.py` modules only declare fixtures (which call into here) and hooks; a helper
used by more than one test module lives here, so there is one `sha256`, one `push_image`
and one way to start each kind of server.

- digests: `sha256()`.
- oci: speaking the registry protocol to an in-process server (push blobs, images,
  manifests; error envelopes; raw requests); inprocess: such a server and its config.
- served: regproxy served as `regproxy serve` does, and raw-socket upload helpers.
- fake_upstream, proxy: a fault-injecting upstream and a proxy in front of it.
- auth, certs, tree: test users and rules, a test CA, what may exist on disk.
- images, processes, skopeo, podman, dockerd, ctr, containers_conf, registry_http,
  access_log, pull_through, tools: real clients against real server processes.
- seaweed: SeaweedFS (`weed mini`) as the real S3 engine of the object-storage tests.

Nothing in here talks to the network beyond 127.0.0.1: images are generated in pure Python
and every server is started on a loopback port.
"""
