#!/usr/bin/env python3
"""Write the seed corpora of the avf_* fuzz targets (layouts in each target's header).

Run from fuzz/: python3 seeds/gen_avf_seeds.py
"""
import os
import struct


def put(d, name, data):
    os.makedirs(f"corpus/{d}", exist_ok=True)
    with open(f"corpus/{d}/{name}", "wb") as f:
        f.write(data)


def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def ipv4_tcp(dst, payload):
    tcp_len = 20 + len(payload)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + tcp_len, 1, 0x4000, 64, 6, 0,
                               bytes([169, 254, 0, 1]), bytes([169, 254, 0, 2])))
    ip[10:12] = struct.pack("!H", 0xFFFF - csum(bytes(ip)))
    tcp = bytearray(struct.pack("!HHIIBBHHH", 1000, 2000, 1, 0, 0x50, 0x18, 512, 0, 0)) + payload
    pseudo = bytes(ip[12:20]) + struct.pack("!BBH", 0, 6, tcp_len)
    tcp[16:18] = struct.pack("!H", 0xFFFF - csum(pseudo + bytes(tcp)))
    return dst + bytes([0x52, 0x54, 0, 0, 0, 9, 0x08, 0x00]) + bytes(ip) + bytes(tcp)


ME = bytes([0x52, 0x54, 0, 0x12, 0x34, 0x56])

# --- avf_virtchnl: [pairs] then [op index, len16, bytes] ---------------------------------
OPS = ["VERSION", "RESET_VF", "GET_VF_RESOURCES", "CONFIG_TX_QUEUE", "CONFIG_RX_QUEUE",
       "CONFIG_VSI_QUEUES", "CONFIG_IRQ_MAP", "ENABLE_QUEUES", "DISABLE_QUEUES", "ADD_ETH_ADDR",
       "DEL_ETH_ADDR", "CONFIG_PROMISCUOUS_MODE", "GET_STATS", "EVENT", "CONFIG_RSS_HFUNC",
       "CONFIG_RSS_KEY", "CONFIG_RSS_LUT", "GET_RSS_HENA_CAPS", "SET_RSS_HENA", "REQUEST_QUEUES"]


def rec(name, body):
    return bytes([OPS.index(name)]) + struct.pack("<H", len(body)) + body


def qpair(q, tx, rx):
    txq = struct.pack("<HHHHQQ", 1, q, 64, 0, tx, 0)
    rxq = struct.pack("<HHIHHIIBB2sQiI", 1, q, 64, 0, 0, 1536, 9728, 0, 0, b"\0\0", rx, 0, 0)
    return txq + rxq


linux = (bytes([2])
         + rec("VERSION", struct.pack("<II", 1, 1))
         + rec("GET_VF_RESOURCES", struct.pack("<I", 0x1ABD8CF9))
         + rec("CONFIG_IRQ_MAP", struct.pack("<H", 3) + struct.pack("<6H", 1, 1, 1, 1, 0, 1)
               + struct.pack("<6H", 1, 2, 2, 2, 0, 1) + struct.pack("<6H", 1, 0, 0, 0, 0, 0) + bytes(12))
         + rec("CONFIG_RSS_KEY", struct.pack("<HH", 1, 52) + bytes(range(52)) + b"\0")
         + rec("CONFIG_RSS_LUT", struct.pack("<HH", 1, 64) + bytes([i % 2 for i in range(64)]) + b"\0")
         + rec("ADD_ETH_ADDR", struct.pack("<HH", 1, 2) + ME + b"\1\0" + bytes([0x33, 0x33, 0, 0, 0, 1]) + b"\2\0")
         + rec("CONFIG_VSI_QUEUES", struct.pack("<HHI", 1, 2, 0) + qpair(0, 0x10000, 0x20000)
               + qpair(1, 0x30000, 0x40000) + bytes(64))
         + rec("ENABLE_QUEUES", struct.pack("<HHII", 1, 0, 3, 3))
         + rec("CONFIG_PROMISCUOUS_MODE", struct.pack("<HH", 1, 3))
         + rec("GET_STATS", struct.pack("<HHII", 1, 0, 0, 0))
         + rec("DISABLE_QUEUES", struct.pack("<HHII", 1, 0, 3, 3))
         + rec("DEL_ETH_ADDR", struct.pack("<HH", 1, 1) + ME + b"\1\0")
         + rec("REQUEST_QUEUES", struct.pack("<H", 1))
         + rec("RESET_VF", b""))
put("avf_virtchnl", "linux-bringup", linux)
put("avf_virtchnl", "dpdk-rss", bytes([4]) + rec("VERSION", struct.pack("<II", 1, 1))
    + rec("GET_VF_RESOURCES", struct.pack("<I", 0x000800A1))
    + rec("SET_RSS_HENA", struct.pack("<Q", 0)) + rec("GET_RSS_HENA_CAPS", b"")
    + rec("SET_RSS_HENA", struct.pack("<Q", 0x7F9FE0000000))
    + rec("CONFIG_RSS_HFUNC", struct.pack("<HHI", 1, 0, 0)))


# --- avf_tx: [n, descriptors, bytes] -------------------------------------------------------
def data_qw1(cmd, size, maclen=14, iplen=20, l4len=20):
    off = (maclen // 2) | ((iplen // 4) << 7) | ((l4len // 4) << 14)
    return (cmd << 4) | (off << 16) | (size << 34)


EOP, RS, IPV4_CSUM, TCP, UDP = 0x1, 0x2, 0x60, 0x100, 0x300
frame = ipv4_tcp(ME, bytes(range(200)))
ctx = 1 | (1 << 4) | ((len(frame) - 54) << 30) | (100 << 50)
put("avf_tx", "tso-two-buffers", bytes([3]) + struct.pack("<QQ", 0, ctx)
    + struct.pack("<QQ", 0, data_qw1(IPV4_CSUM | TCP, 100))
    + struct.pack("<QQ", 0, data_qw1(IPV4_CSUM | TCP | EOP | RS, len(frame) - 100)) + frame)
put("avf_tx", "csum-one-buffer", bytes([1])
    + struct.pack("<QQ", 0, data_qw1(IPV4_CSUM | TCP | EOP | RS, len(frame))) + frame)

# --- avf_rx: [flags, promisc, lut_len, key52, frame] ---------------------------------------
for name, fl, fr in [("tcp-good", 0, ipv4_tcp(ME, b"hello")),
                     ("tcp-valid-flag", 1, ipv4_tcp(ME, b"hello")),
                     ("broadcast-arp", 2, b"\xff" * 6 + ME + b"\x08\x06" + bytes(28))]:
    put("avf_rx", name, bytes([fl, 0, 64]) + bytes(range(52)) + fr)


# --- avf_device: 20-byte ops [kind, a, b, c, value16] --------------------------------------
def op(kind, a=0, b=0, c=0, v=b""):
    return bytes([kind, a, b, c]) + (v + bytes(16))[:16]


tx = op(0, 0, v=struct.pack("<QQ", 0x9000, data_qw1(IPV4_CSUM | TCP | EOP | RS, 60)))
put("avf_device", "tx-one", tx + op(1, 1))
put("avf_device", "rx-one", op(6, 0, 60, 0, ME + b"\x08\x00") + op(4, 0x00, 0x19))
put("avf_device", "aq-stats", op(2, 0x80, 0x00, 0x34, struct.pack("<HB", 12, 15) + b"\1\0"))
put("avf_device", "reset-then-tx", op(7) + tx + op(1, 1))
