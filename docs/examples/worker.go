// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)

// A minimal reuseportd worker in Go, standard library only (Debian's golang-go, Go 1.19 or later).
//
// Build it, then configure it:
//
//	CGO_ENABLED=0 go build -o /usr/local/bin/reuseport-worker-go worker.go
//
//	[[service]]
//	name = "echo"
//	listen = ["udp://0.0.0.0:5300", "tcp://0.0.0.0:5300"]
//	workers = 4
//	exec = ["/usr/local/bin/reuseport-worker-go"]
//	notify = true            # ready when it says READY=1, not after ready_after_ms
//	watchdog_ms = 5000       # restarted if it stops sending WATCHDOG=1
//	drain_signal = "SIGUSR2" # told that its slot is leaving: finish what it holds
//
// What it shows, as worker.py and worker.c do:
//   - its sockets: LISTEN_FDS of them from fd 3 on, in the order of `listen`; never bind a
//     socket of its own: the slot's socket is what keeps its flows;
//   - UDP: answer each datagram from the socket it came on; TCP: accept on the listener;
//   - sd_notify: READY=1 once it serves, WATCHDOG=1 every WATCHDOG_USEC/2, STATUS= for humans;
//   - the drain signal: stop taking new work, serve open connections until they close, then exit;
//   - SIGTERM: exit promptly (the daemon sends SIGKILL at stop_timeout_ms).
//
// Each answer is "slot=<REUSEPORT_SLOT> generation=<REUSEPORT_GENERATION> <what was sent>".
package main

import (
	"fmt"
	"net"
	"os"
	"os/signal"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"
)

const listenFdsStart = 3 // SD_LISTEN_FDS_START

// notify is sd_notify(3): one datagram to NOTIFY_SOCKET; nothing when there is none. Go takes a
// leading '@' for the abstract namespace, as systemd writes it.
func notify(state string) {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err == nil {
		_, err = conn.Write([]byte(state))
		conn.Close()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "notify %q: %v\n", path, err)
	}
}

// listenFiles are the sockets passed by socket activation (sd_listen_fds(3)): checked, not taken blindly.
func listenFiles() []*os.File {
	if os.Getenv("LISTEN_PID") != strconv.Itoa(os.Getpid()) {
		fatal("LISTEN_PID is not this process: start me from reuseportd")
	}
	count, err := strconv.Atoi(os.Getenv("LISTEN_FDS"))
	if err != nil || count < 1 {
		fatal("no LISTEN_FDS: start me from reuseportd")
	}
	files := make([]*os.File, count)
	for i := range files {
		files[i] = os.NewFile(uintptr(listenFdsStart+i), fmt.Sprintf("listener %d", i))
	}
	return files
}

func fatal(message string) {
	fmt.Fprintln(os.Stderr, message)
	os.Exit(1)
}

func main() {
	prefix := []byte(fmt.Sprintf("slot=%s generation=%s ", os.Getenv("REUSEPORT_SLOT"), os.Getenv("REUSEPORT_GENERATION")))
	// Asked for before READY=1: a signal that comes early is not lost.
	signals := make(chan os.Signal, 2)
	signal.Notify(signals, syscall.SIGUSR2, syscall.SIGTERM)

	var open atomic.Int64 // TCP connections being served
	closed := make(chan struct{}, 16)
	var stops []func() // each stops one listener taking new work
	files := listenFiles()
	for _, file := range files {
		kind, err := syscall.GetsockoptInt(int(file.Fd()), syscall.SOL_SOCKET, syscall.SO_TYPE)
		if err != nil {
			fatal(fmt.Sprintf("%s: SO_TYPE: %v", file.Name(), err))
		}
		if kind == syscall.SOCK_DGRAM {
			conn, err := net.FilePacketConn(file)
			if err != nil {
				fatal(fmt.Sprintf("%s: %v", file.Name(), err))
			}
			go serveDatagrams(conn, prefix)
			stops = append(stops, func() { conn.SetReadDeadline(time.Now()) })
		} else {
			listener, err := net.FileListener(file)
			if err != nil {
				fatal(fmt.Sprintf("%s: %v", file.Name(), err))
			}
			go acceptConnections(listener.(*net.TCPListener), prefix, &open, closed)
			stops = append(stops, func() { listener.(*net.TCPListener).SetDeadline(time.Now()) })
		}
		file.Close() // the net package holds its own copy
	}

	var ping <-chan time.Time
	if usec, _ := strconv.Atoi(os.Getenv("WATCHDOG_USEC")); usec > 0 {
		ping = time.NewTicker(time.Duration(usec) * time.Microsecond / 2).C
	}
	ready := fmt.Sprintf("READY=1\nSTATUS=serving %d sockets", len(files))
	if ping != nil {
		ready += "\nWATCHDOG=1"
	}
	notify(ready)

	draining := false
	for !draining || open.Load() > 0 {
		select {
		case received := <-signals:
			if received == syscall.SIGTERM {
				notify("STOPPING=1")
				return
			}
			if !draining {
				// No new work: the daemon steers new flows elsewhere. Open connections go on.
				draining = true
				for _, stop := range stops {
					stop()
				}
				notify(fmt.Sprintf("STATUS=draining, %d connections open", open.Load()))
			}
		case <-closed:
		case <-ping:
			notify("WATCHDOG=1")
		}
	}
	notify("STOPPING=1")
}

// serveDatagrams answers each datagram from the socket it came on, until the drain stops it.
func serveDatagrams(conn net.PacketConn, prefix []byte) {
	buffer := make([]byte, 65535)
	for {
		count, peer, err := conn.ReadFrom(buffer)
		if err != nil {
			return
		}
		if _, err := conn.WriteTo(append(append([]byte{}, prefix...), buffer[:count]...), peer); err != nil {
			fmt.Fprintf(os.Stderr, "answer to %v: %v\n", peer, err)
		}
	}
}

// acceptConnections serves each connection until its client closes it; the drain stops the accepting.
func acceptConnections(listener *net.TCPListener, prefix []byte, open *atomic.Int64, closed chan<- struct{}) {
	for {
		conn, err := listener.Accept()
		if err != nil {
			return
		}
		open.Add(1)
		go func() {
			defer func() {
				conn.Close()
				open.Add(-1)
				closed <- struct{}{}
			}()
			buffer := make([]byte, 65536)
			for {
				count, err := conn.Read(buffer)
				if err != nil {
					return
				}
				if _, err := conn.Write(append(append([]byte{}, prefix...), buffer[:count]...)); err != nil {
					return
				}
			}
		}()
	}
}
