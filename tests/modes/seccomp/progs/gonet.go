// Test program for seccomp mode (stdlib only): a TCP/UDP server and client.
//   gonet serve ADDR        TCP: answer each connection with "go <local addr>\n"
//   gonet dial ADDR N       TCP: N connections, print each answer's count and the last one
//   gonet udpecho ADDR      UDP: echo datagrams
//   gonet udpdial ADDR      UDP: send one datagram, print the echo
package main

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"strconv"
	"time"
)

func main() {
	switch os.Args[1] {
	case "serve":
		ln, err := net.Listen("tcp", os.Args[2])
		if err != nil {
			fmt.Println("listen:", err)
			os.Exit(1)
		}
		fmt.Println("listening", ln.Addr())
		for {
			c, err := ln.Accept()
			if err != nil {
				fmt.Println("accept:", err)
				os.Exit(1)
			}
			go func(c net.Conn) {
				fmt.Fprintf(c, "go %s\n", c.LocalAddr())
				c.Close()
			}(c)
		}
	case "dial":
		n, _ := strconv.Atoi(os.Args[3])
		last := ""
		for i := 0; i < n; i++ {
			c, err := net.DialTimeout("tcp", os.Args[2], 5*time.Second)
			if err != nil {
				fmt.Println("dial:", err)
				os.Exit(1)
			}
			line, err := bufio.NewReader(c).ReadString('\n')
			if err != nil {
				fmt.Println("read:", err)
				os.Exit(1)
			}
			last = line
			c.Close()
		}
		fmt.Printf("ok %d %s", n, last)
	case "udpecho":
		pc, err := net.ListenPacket("udp", os.Args[2])
		if err != nil {
			fmt.Println("listen:", err)
			os.Exit(1)
		}
		fmt.Println("listening", pc.LocalAddr())
		buf := make([]byte, 2048)
		for {
			n, a, err := pc.ReadFrom(buf)
			if err != nil {
				os.Exit(1)
			}
			pc.WriteTo(buf[:n], a)
		}
	case "udpdial":
		c, err := net.Dial("udp", os.Args[2])
		if err != nil {
			fmt.Println("dial:", err)
			os.Exit(1)
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		c.Write([]byte("ping-go"))
		buf := make([]byte, 100)
		n, err := c.Read(buf)
		if err != nil {
			fmt.Println("read:", err)
			os.Exit(1)
		}
		fmt.Printf("echo %s\n", buf[:n])
	}
}
