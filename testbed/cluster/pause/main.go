// Command pause holds a pod's namespaces open for as long as the pod lives:
// the kubelet starts it as the first process of every pod sandbox, and the
// pod's containers join its network and IPC namespaces. It is PID 1 when the
// pod shares its process namespace, so it also reaps the zombies that
// orphaned processes leave behind. No registry is reachable from the test
// cluster, so the usual registry.k8s.io/pause image cannot be pulled; this
// one is built here (static, no cgo) and imported into containerd.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

// version is stamped by build.sh (-X main.version=...).
var version = "dev"

func main() {
	if len(os.Args) > 1 && (os.Args[1] == "-v" || os.Args[1] == "--version") {
		fmt.Println("pause", version)
		return
	}
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for sig := range signals {
		if sig == syscall.SIGCHLD {
			reap()
			continue
		}
		// Exit code 0 on a requested stop, like the upstream pause: the
		// kubelet reads a non-zero sandbox exit as a crash.
		fmt.Fprintf(os.Stderr, "pause: shutting down on %v\n", sig)
		os.Exit(0)
	}
}

// reap collects every exited child; one SIGCHLD may stand for several.
func reap() {
	for {
		var status syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
		if pid <= 0 || err != nil {
			return
		}
	}
}
