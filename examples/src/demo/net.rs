//! Two virtio-net devices on emudevd's in-process switch, each driven over its own vfio-user
//! socket by a small driver: one RX and one TX queue, no offloads. Frames go from one NIC to
//! the other through the switch and are counted and checked on arrival (addresses, length,
//! sequence number, payload), in both directions.

use std::path::Path;
use std::time::{Duration, Instant};

use emudev::pci::EventFd;
use emudev_vfio_user::Client;
use vm_memory::{Bytes, VolatileMemory};

use super::virtio::{QueueLayout, SplitQueue, Transport};
use super::{pattern, wait_irq, DemoError, Progress, SharedRam, Step};

const VIRTIO_NET_ID: u16 = 0x1041;
const F_MAC: u64 = 1 << 5;
const F_STATUS: u64 = 1 << 16;
const LINK_UP: u16 = 1;
/// `virtio_net_hdr_v1`: what precedes every frame on both queues with VERSION_1.
const HDR_LEN: usize = 12;
/// A local experimental EtherType (IEEE 802), so nothing else claims the frames.
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
const MAGIC: &[u8; 8] = b"EMUDEVNT";
/// Frame sizes the demo accepts: a minimal Ethernet frame up to a standard MTU.
const MIN_FRAME: usize = 60;
const MAX_FRAME: usize = 1514;

const QSIZE: u16 = 64;
const BUF: u64 = 2048;
const RX_Q: QueueLayout = QueueLayout {
    desc: 0x0,
    avail: 0x1000,
    used: 0x2000,
};
const TX_Q: QueueLayout = QueueLayout {
    desc: 0x4000,
    avail: 0x5000,
    used: 0x6000,
};
const RX_BUFS: u64 = 0x10_0000;
const TX_BUFS: u64 = 0x20_0000;
const RAM: usize = 0x30_0000;
/// How long the demo waits for any progress before it calls the link broken.
const STALL: Duration = Duration::from_secs(10);

/// What to do.
#[derive(Debug, Clone)]
pub struct NetOptions {
    /// Frames sent each way.
    pub frames: u64,
    /// Ethernet frame length (without the virtio-net header), 60 to 1514.
    pub frame_len: usize,
    /// Frames in flight (sent, not yet received) at most.
    pub window: u16,
    pub verbose: bool,
}

impl Default for NetOptions {
    fn default() -> Self {
        Self {
            frames: 20_000,
            frame_len: 1024,
            window: 32,
            verbose: true,
        }
    }
}

/// One direction's transfer.
#[derive(Debug, Clone, Copy, Default)]
pub struct Flow {
    pub sent: u64,
    pub received: u64,
    pub bytes: u64,
    pub elapsed: Duration,
}

impl Flow {
    pub fn frames_per_s(&self) -> f64 {
        self.received as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// What the run found.
#[derive(Debug, Clone, Default)]
pub struct NetReport {
    pub mac_a: [u8; 6],
    pub mac_b: [u8; 6],
    pub a_to_b: Flow,
    pub b_to_a: Flow,
}

/// Format a MAC address the usual way.
pub fn mac_str(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// One NIC: its connection, guest RAM, queues and interrupts.
struct Nic {
    name: &'static str,
    c: Client,
    ram: SharedRam,
    t: Transport,
    rx: SplitQueue,
    tx: SplitQueue,
    rx_irq: EventFd,
    mac: [u8; 6],
    /// TX slots not in flight.
    tx_free: Vec<u16>,
}

impl Nic {
    fn open(name: &'static str, path: &Path) -> Result<Self, DemoError> {
        let mut c = Client::connect(path).step("connect")?;
        c.negotiate().step("negotiate")?;
        let ram = SharedRam::new(RAM)?;
        ram.dma_map(&mut c)?;
        let (t, cfg) = Transport::probe(&mut c, VIRTIO_NET_ID)?;
        // Vectors: 0 config, 1 RX, 2 TX.
        let mut irqs = super::pci::enable_msix(&mut c, &cfg, 3)?;
        let features = t.negotiate(&mut c, F_MAC | F_STATUS)?;
        t.set_config_vector(&mut c, 0)?;
        let rx = t.setup_queue(&mut c, 0, QSIZE, RX_Q, 1)?;
        let tx = t.setup_queue(&mut c, 1, QSIZE, TX_Q, 2)?;
        t.driver_ok(&mut c)?;
        let cfgb = t.device_config(&mut c, 0, 8)?;
        let mut mac = [0u8; 6];
        match cfgb.get(..6) {
            Some(m) if features & F_MAC != 0 => mac.copy_from_slice(m),
            _ => return Err(DemoError::Device("the NIC offers no MAC address".into())),
        }
        if features & F_STATUS != 0 {
            let st = cfgb
                .get(6..8)
                .map_or(0, |s| u16::from_le_bytes([s[0], s[1]]));
            if st & LINK_UP == 0 {
                return Err(DemoError::Device(format!("{name}: link is down")));
            }
        }
        irqs.truncate(2);
        let rx_irq = irqs
            .pop()
            .ok_or(DemoError::Device("no MSI-X vector".into()))?;
        let tx_free = (0..tx.size).rev().collect();
        let mut nic = Self {
            name,
            c,
            ram,
            t,
            rx,
            tx,
            rx_irq,
            mac,
            tx_free,
        };
        for slot in 0..nic.rx.size {
            nic.rx.add(&nic.ram, slot, rx_buf(slot), BUF as u32, true)?;
        }
        nic.rx.kick(&mut nic.c, &nic.ram)?;
        Ok(nic)
    }

    /// Queue one frame (header, addresses, our payload for `seq`); false when the TX ring
    /// is full.
    fn send(&mut self, dst: [u8; 6], seq: u64, len: usize) -> Result<bool, DemoError> {
        let Some(slot) = self.tx_free.pop() else {
            return Ok(false);
        };
        let frame = make_frame(dst, self.mac, seq, len);
        let addr = tx_buf(slot);
        let m = self.ram.map.as_volatile_slice();
        m.write_slice(&[0u8; HDR_LEN], addr as usize)
            .and_then(|()| m.write_slice(&frame, addr as usize + HDR_LEN))
            .map_err(|e| DemoError::Device(format!("TX buffer: {e}")))?;
        self.tx
            .add(&self.ram, slot, addr, (HDR_LEN + len) as u32, false)?;
        Ok(true)
    }

    /// Take back TX slots the device is done with.
    fn reap_tx(&mut self) -> Result<(), DemoError> {
        for (slot, _) in self.tx.pop_used(&self.ram)? {
            self.tx_free.push(slot);
        }
        Ok(())
    }

    /// Frames received since the last call, as (sequence number, length), each checked and
    /// its buffer given back to the device.
    fn receive(&mut self, src: [u8; 6], len: usize) -> Result<Vec<u64>, DemoError> {
        let used = self.rx.pop_used(&self.ram)?;
        let mut seqs = Vec::with_capacity(used.len());
        let mut got = vec![0u8; HDR_LEN + MAX_FRAME];
        for &(slot, used_len) in &used {
            let n = used_len as usize;
            if n != HDR_LEN + len {
                return Err(DemoError::Mismatch(format!(
                    "{}: received {n} bytes, expected {}",
                    self.name,
                    HDR_LEN + len
                )));
            }
            self.ram
                .map
                .as_volatile_slice()
                .read_slice(&mut got[..n], rx_buf(slot) as usize)
                .map_err(|e| DemoError::Device(format!("RX buffer: {e}")))?;
            seqs.push(check_frame(&got[HDR_LEN..n], self.mac, src)?);
            self.rx
                .add(&self.ram, slot, rx_buf(slot), BUF as u32, true)?;
        }
        if !used.is_empty() {
            self.rx.kick(&mut self.c, &self.ram)?;
        }
        Ok(seqs)
    }

    /// Leave the device as a driver would on unload.
    fn close(mut self) -> Result<(), DemoError> {
        self.t.set_status(&mut self.c, 0)?;
        self.c.dma_unmap_all().step("DMA_UNMAP")?;
        Ok(())
    }
}

fn rx_buf(slot: u16) -> u64 {
    RX_BUFS + BUF * u64::from(slot)
}

fn tx_buf(slot: u16) -> u64 {
    TX_BUFS + BUF * u64::from(slot)
}

/// dst, src, EtherType, magic, sequence number, then a pattern that depends on it.
fn make_frame(dst: [u8; 6], src: [u8; 6], seq: u64, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&ETHERTYPE);
    f[14..22].copy_from_slice(MAGIC);
    f[22..30].copy_from_slice(&seq.to_le_bytes());
    pattern(seq, 0, &mut f[30..]);
    f
}

/// Check a received frame is the demo's, from `src` to `dst`, and return its sequence.
fn check_frame(f: &[u8], dst: [u8; 6], src: [u8; 6]) -> Result<u64, DemoError> {
    let bad = |what: String| Err(DemoError::Mismatch(what));
    if f.len() < MIN_FRAME {
        return bad(format!("frame of {} bytes", f.len()));
    }
    if f[..6] != dst || f[6..12] != src {
        return bad(format!(
            "frame {} -> {}, expected {} -> {}",
            mac_str(&f[6..12].try_into().unwrap_or_default()),
            mac_str(&f[..6].try_into().unwrap_or_default()),
            mac_str(&src),
            mac_str(&dst)
        ));
    }
    if f[12..14] != ETHERTYPE || &f[14..22] != MAGIC {
        return bad("not a demo frame (EtherType or magic)".into());
    }
    let seq = u64::from_le_bytes(f[22..30].try_into().unwrap_or_default());
    let mut want = vec![0u8; f.len() - 30];
    pattern(seq, 0, &mut want);
    if f[30..] != want[..] {
        return bad(format!("frame {seq}: payload differs from what was sent"));
    }
    Ok(seq)
}

/// Send `o.frames` frames from `from` to `to`, at most `o.window` in flight, and check each
/// arrives exactly once.
fn stream(
    from: &mut Nic,
    to: &mut Nic,
    o: &NetOptions,
    label: &'static str,
) -> Result<Flow, DemoError> {
    let window = u64::from(o.window.clamp(1, QSIZE / 2));
    let mut seen = vec![false; usize::try_from(o.frames).unwrap_or(usize::MAX)];
    let mut flow = Flow::default();
    let mut bar = Progress::new(label, o.frames, o.verbose);
    let t0 = Instant::now();
    let mut last_progress = Instant::now();
    while flow.received < o.frames {
        from.reap_tx()?;
        let mut queued = false;
        while flow.sent < o.frames && flow.sent - flow.received < window {
            if !from.send(to.mac, flow.sent, o.frame_len)? {
                break;
            }
            flow.sent += 1;
            queued = true;
        }
        if queued {
            from.tx.kick(&mut from.c, &from.ram)?;
        }
        let seqs = to.receive(from.mac, o.frame_len)?;
        if seqs.is_empty() {
            if last_progress.elapsed() > STALL {
                return Err(DemoError::Device(format!(
                    "{label}: {} of {} frames arrived, then nothing for {}s",
                    flow.received,
                    flow.sent,
                    STALL.as_secs()
                )));
            }
            wait_irq(&to.rx_irq, Duration::from_millis(20))?;
            continue;
        }
        last_progress = Instant::now();
        for s in seqs {
            match usize::try_from(s).ok().and_then(|i| seen.get_mut(i)) {
                Some(x) if !*x => *x = true,
                Some(_) => return Err(DemoError::Mismatch(format!("frame {s} arrived twice"))),
                None => return Err(DemoError::Mismatch(format!("frame {s} was never sent"))),
            }
            flow.received += 1;
            flow.bytes += o.frame_len as u64;
        }
        bar.update(flow.received);
    }
    flow.elapsed = t0.elapsed();
    bar.finish(&format!(
        "{} frames, {:.0} frames/s, {:.1} MiB/s, all checked",
        flow.received,
        flow.frames_per_s(),
        flow.bytes as f64 / f64::from(1 << 20) / flow.elapsed.as_secs_f64().max(1e-9)
    ));
    Ok(flow)
}

/// Bring up the NICs at `a` and `b` (on the same switch), send frames both ways and check
/// every one arrives once and intact.
pub fn run(a: &Path, b: &Path, o: &NetOptions) -> Result<NetReport, DemoError> {
    if !(MIN_FRAME..=MAX_FRAME).contains(&o.frame_len) {
        return Err(DemoError::Device(format!(
            "frame length must be {MIN_FRAME} to {MAX_FRAME}"
        )));
    }
    let mut na = Nic::open("A", a)?;
    let mut nb = Nic::open("B", b)?;
    if na.mac == nb.mac {
        return Err(DemoError::Device(format!(
            "both NICs have MAC {}",
            mac_str(&na.mac)
        )));
    }
    if o.verbose {
        println!(
            "virtio-net: A {} <-> switch <-> B {}, {} byte frames, {} in flight",
            mac_str(&na.mac),
            mac_str(&nb.mac),
            o.frame_len,
            o.window
        );
    }
    // One frame each way first, so the switch learns both addresses and the streams below
    // are forwarded, not flooded.
    let hello = NetOptions {
        frames: 1,
        verbose: false,
        ..o.clone()
    };
    stream(&mut nb, &mut na, &hello, "B->A")?;
    stream(&mut na, &mut nb, &hello, "A->B")?;
    let report = NetReport {
        mac_a: na.mac,
        mac_b: nb.mac,
        a_to_b: stream(&mut na, &mut nb, o, "A->B")?,
        b_to_a: stream(&mut nb, &mut na, o, "B->A")?,
    };
    na.close()?;
    nb.close()?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
    const B: [u8; 6] = [2, 0, 0, 0, 0, 0xb];

    #[test]
    fn frames_round_trip_through_the_checker() {
        let f = make_frame(B, A, 77, 200);
        assert_eq!(check_frame(&f, B, A).unwrap(), 77);
        // Wrong direction, damaged payload, damaged sequence: all caught.
        assert!(check_frame(&f, A, B).is_err());
        let mut g = f.clone();
        g[150] ^= 1;
        assert!(check_frame(&g, B, A).is_err());
        let mut g = f;
        g[22] ^= 1;
        assert!(check_frame(&g, B, A).is_err());
        assert!(check_frame(&[0u8; 20], B, A).is_err());
    }
}
