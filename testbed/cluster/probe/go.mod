// A static HTTPS client for the real node's test image, built by
// testbed/cluster/build.sh (see main.go for why busybox's wget is not enough).
module pqfed.local/testbed/cluster/probe

go 1.26.0
