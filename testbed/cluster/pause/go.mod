// The sandbox ("pause") program of the test cluster's real node, built by
// testbed/cluster/build.sh and packed into an image by testbed/cluster/images.sh.
module pqfed.local/testbed/cluster/pause

go 1.26.0
