//! Request validation and dispatch: one function per command. Everything a device sees has
//! been checked here (indexes, ranges with checked arithmetic, sizes, flags, fds).

use std::os::fd::OwnedFd;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crossbeam_channel::Sender;
use mio::Waker;
use zerocopy::{FromBytes, IntoBytes};

use super::dma_msg::{parse_dma_reply, ConnTransport, DmaRequest};
use super::{Conn, DmaLayout, ServerOptions};
use crate::caps::{self, PeerCaps, ServerCaps};
use crate::codec::{self, Frame, Message, Outgoing};
use crate::device::{Errno, IrqAction, IrqData, ServerDevice};
use crate::dma::{DmaPort, DmaRegion};
use crate::wire::{self, cmd, dma_flags, hdr_flags, irq_set_flags as isf};

/// A reply to send, or nothing.
pub(super) enum Reply {
    Ok(Vec<u8>, Vec<Arc<OwnedFd>>),
    Err(Errno),
}

pub(super) fn ok(payload: Vec<u8>) -> Result<Reply, Errno> {
    Ok(Reply::Ok(payload, Vec::new()))
}

pub(super) fn errno_u32(e: Errno) -> u32 {
    e as i32 as u32
}

pub(super) fn dispatch_frame<D: ServerDevice>(
    c: &mut Conn,
    dev: &mut D,
    opts: &ServerOptions,
    dma_tx: &Sender<DmaRequest>,
    waker: &Arc<Waker>,
    frame: Frame,
) {
    let msg = match frame {
        Frame::Message(m) => m,
        Frame::Rejected { header, error } => {
            log::warn!(
                "vfio-user: rejected {} id={}: {error}",
                cmd::name(header.command),
                header.msg_id
            );
            if let crate::codec::FrameError::TooLarge(size) = error {
                if u64::from(size) > super::MAX_SKIP {
                    c.doomed = Some("message size beyond any skip limit; closing");
                }
            }
            if !header.no_reply() && !header.is_reply() {
                let errno = match error {
                    crate::codec::FrameError::TooLarge(_) => Errno::E2BIG,
                    _ => Errno::EINVAL,
                };
                c.out.push(Outgoing {
                    bytes: codec::error_reply(&header, errno_u32(errno)),
                    fds: vec![],
                });
            }
            return;
        }
    };
    let h = msg.header;
    log::debug!(
        "vfio-user: <- {} id={} size={} flags={:#x} fds={}",
        cmd::name(h.command),
        h.msg_id,
        h.msg_size,
        h.flags,
        msg.fds.len()
    );
    if h.is_reply() {
        let matched = c.pending.get(&h.msg_id).is_some_and(|p| {
            h.command
                == if p.write {
                    cmd::DMA_WRITE
                } else {
                    cmd::DMA_READ
                }
        });
        if matched {
            if let Some(p) = c.pending.remove(&h.msg_id) {
                let r = parse_dma_reply(c.layout, &p, &msg);
                if let Err(e) = &r {
                    log::warn!("vfio-user: DMA reply id={}: {e}", h.msg_id);
                }
                let _ = p.reply.send(r);
            }
        } else {
            log::warn!(
                "vfio-user: dropping unsolicited reply {} id={}",
                cmd::name(h.command),
                h.msg_id
            );
        }
        return;
    }
    let no_reply = h.no_reply();
    let result = if h.msg_type() != hdr_flags::TYPE_COMMAND {
        log::warn!("vfio-user: bad message type {:#x}", h.msg_type());
        Err(Errno::EINVAL)
    } else {
        handle_command(c, dev, opts, dma_tx, waker, msg)
    };
    let reply = match result {
        Ok(r) => r,
        Err(e) => Reply::Err(e),
    };
    match reply {
        Reply::Err(e) => {
            if no_reply {
                log::warn!(
                    "vfio-user: posted {} id={} failed: {e}",
                    cmd::name(h.command),
                    h.msg_id
                );
            } else {
                log::debug!(
                    "vfio-user: -> error {e} for {} id={}",
                    cmd::name(h.command),
                    h.msg_id
                );
                c.out.push(Outgoing {
                    bytes: codec::error_reply(&h, errno_u32(e)),
                    fds: vec![],
                });
            }
        }
        Reply::Ok(payload, fds) => {
            if !no_reply {
                c.out.push(Outgoing {
                    bytes: codec::reply(&h, &[&payload]),
                    fds,
                });
            }
        }
    }
}

pub(super) fn read_struct<T: FromBytes>(payload: &[u8]) -> Result<T, Errno> {
    T::read_from_prefix(payload)
        .map(|(t, _)| t)
        .map_err(|_| Errno::EINVAL)
}

pub(super) fn handle_command<D: ServerDevice>(
    c: &mut Conn,
    dev: &mut D,
    opts: &ServerOptions,
    dma_tx: &Sender<DmaRequest>,
    waker: &Arc<Waker>,
    msg: Message,
) -> Result<Reply, Errno> {
    let command = msg.header.command;
    let takes_fds = matches!(command, cmd::DMA_MAP | cmd::DEVICE_SET_IRQS);
    if !takes_fds && !msg.fds.is_empty() {
        log::warn!(
            "vfio-user: {} carried {} unexpected fds",
            cmd::name(command),
            msg.fds.len()
        );
        return Err(Errno::EINVAL);
    }
    if command == cmd::VERSION {
        return version(c, dev, opts, dma_tx, waker, &msg.payload);
    }
    let Some(peer) = c.peer else {
        log::warn!("vfio-user: {} before VERSION", cmd::name(command));
        return Err(Errno::EINVAL);
    };
    let Message { payload, fds, .. } = msg;
    match command {
        cmd::DMA_MAP => dma_map(c, dev, &payload, fds),
        cmd::DMA_UNMAP => dma_unmap(c, dev, &payload),
        cmd::DEVICE_GET_INFO => get_info(dev, &payload),
        cmd::DEVICE_GET_REGION_INFO => region_info(dev, &payload),
        cmd::DEVICE_GET_REGION_IO_FDS => region_io_fds(dev, &peer, &payload),
        cmd::DEVICE_GET_IRQ_INFO => irq_info(dev, &payload),
        cmd::DEVICE_SET_IRQS => set_irqs(dev, &payload, fds),
        cmd::REGION_READ => region_read(dev, &payload),
        cmd::REGION_WRITE => region_write(dev, &payload),
        cmd::REGION_WRITE_MULTI => write_multi(dev, &payload),
        cmd::DEVICE_RESET => {
            if dev.device_desc().flags & wire::device_flags::RESET == 0 {
                return Err(Errno::EINVAL);
            }
            dev.reset()?;
            ok(Vec::new())
        }
        cmd::DIRTY_PAGES | cmd::DEVICE_FEATURE | cmd::MIG_DATA_READ | cmd::MIG_DATA_WRITE => {
            Err(Errno::ENOTSUP)
        }
        _ => {
            log::warn!("vfio-user: unknown or misdirected command {command}");
            Err(Errno::EINVAL)
        }
    }
}

pub(super) fn version<D: ServerDevice>(
    c: &mut Conn,
    dev: &mut D,
    opts: &ServerOptions,
    dma_tx: &Sender<DmaRequest>,
    waker: &Arc<Waker>,
    payload: &[u8],
) -> Result<Reply, Errno> {
    if c.peer.is_some() {
        log::warn!("vfio-user: second VERSION");
        return Err(Errno::EINVAL);
    }
    let peer = caps::parse_version(payload)?;
    if peer.major != wire::VERSION_MAJOR {
        log::warn!("vfio-user: client major version {} unsupported", peer.major);
        return Err(Errno::ENOTSUP);
    }
    let ours = ServerCaps {
        max_dma_maps: opts.max_dma_maps,
        write_multiple: opts.write_multiple,
        ..ServerCaps::default()
    };
    let reply = caps::format_reply(&peer, payload.len(), &ours);
    // QEMU 11.1.3 (seen on the wire) uses the spec layout, whatever its protocol.h says;
    // the QEMU layout stays available as an explicit option for older clients.
    c.layout = opts.dma_layout.unwrap_or(DmaLayout::Spec);
    let chunk = peer
        .max_data_xfer_size
        .min(wire::MAX_DATA_XFER_SIZE as u64)
        .max(1) as usize;
    let t = Arc::new(ConnTransport {
        gen: c.gen,
        tx: dma_tx.clone(),
        waker: waker.clone(),
        loop_thread: std::thread::current().id(),
        alive: AtomicBool::new(true),
        chunk,
        timeout: opts.msg_timeout,
    });
    c.transport = Some(t.clone());
    c.peer = Some(peer);
    log::info!(
        "vfio-user: negotiated v{}.{} (client max_msg_fds={} xfer={} dma layout {:?})",
        peer.major,
        peer.minor,
        peer.max_msg_fds,
        peer.max_data_xfer_size,
        c.layout
    );
    dev.attach(DmaPort::new(t));
    ok(reply)
}

pub(super) fn dma_map<D: ServerDevice>(
    c: &mut Conn,
    dev: &mut D,
    payload: &[u8],
    mut fds: Vec<OwnedFd>,
) -> Result<Reply, Errno> {
    let req: wire::DmaMap = read_struct(payload)?;
    if (req.argsz as usize) < std::mem::size_of::<wire::DmaMap>() {
        return Err(Errno::EINVAL);
    }
    if fds.len() > 1 {
        log::warn!("vfio-user: DMA_MAP with {} fds", fds.len());
        return Err(Errno::EINVAL);
    }
    let added = c.table.map(&req, fds.pop())?;
    if let Err(e) = dev.dma_map(c.table.regions(), &added) {
        log::warn!(
            "vfio-user: device refused DMA map {:#x}+{:#x}: {e}",
            added.iova,
            added.size
        );
        c.table.remove_at(added.iova);
        return Err(e);
    }
    ok(Vec::new())
}

pub(super) fn dma_unmap<D: ServerDevice>(
    c: &mut Conn,
    dev: &mut D,
    payload: &[u8],
) -> Result<Reply, Errno> {
    let req: wire::DmaUnmap = read_struct(payload)?;
    if (req.argsz as usize) < std::mem::size_of::<wire::DmaUnmap>() {
        return Err(Errno::EINVAL);
    }
    let removed: Vec<DmaRegion> = match req.flags {
        0 => c.table.unmap(req.address, req.size)?,
        dma_flags::UNMAP_ALL => {
            if req.address != 0 || req.size != 0 {
                return Err(Errno::EINVAL);
            }
            c.table.clear()
        }
        dma_flags::UNMAP_GET_DIRTY_BITMAP => return Err(Errno::ENOTSUP),
        _ => return Err(Errno::EINVAL),
    };
    if removed.is_empty() {
        log::debug!(
            "vfio-user: DMA_UNMAP {:#x}+{:#x} matched nothing",
            req.address,
            req.size
        );
    } else {
        let r = dev.dma_unmap(c.table.regions(), &removed);
        // Requests the device queued before it quiesced go out ahead of the reply, or
        // fail if they touch what was just unmapped.
        c.take_dma_requests(&removed);
        if let Err(e) = r {
            log::warn!("vfio-user: device failed DMA unmap: {e}");
            return Err(e);
        }
    }
    ok(req.as_bytes().to_vec())
}

pub(super) fn get_info<D: ServerDevice>(dev: &mut D, payload: &[u8]) -> Result<Reply, Errno> {
    let req: wire::DeviceInfo = read_struct(payload)?;
    if (req.argsz as usize) < std::mem::size_of::<wire::DeviceInfo>() {
        return Err(Errno::EINVAL);
    }
    let d = dev.device_desc();
    let info = wire::DeviceInfo {
        argsz: std::mem::size_of::<wire::DeviceInfo>() as u32,
        flags: d.flags,
        num_regions: d.num_regions,
        num_irqs: d.num_irqs,
    };
    ok(info.as_bytes().to_vec())
}

pub(super) fn region_info<D: ServerDevice>(dev: &mut D, payload: &[u8]) -> Result<Reply, Errno> {
    let req: wire::RegionInfo = read_struct(payload)?;
    let head = std::mem::size_of::<wire::RegionInfo>();
    if (req.argsz as usize) < head {
        return Err(Errno::EINVAL);
    }
    if req.index >= dev.device_desc().num_regions {
        return Err(Errno::EINVAL);
    }
    let desc = dev.region(req.index).ok_or(Errno::EINVAL)?;
    let mut flags = desc.flags & (wire::region_flags::READ | wire::region_flags::WRITE);
    let mut cap = Vec::new();
    let mut file_offset = 0;
    if let Some(m) = &desc.mmap {
        flags |= wire::region_flags::MMAP;
        file_offset = m.file_offset;
        let areas: Vec<_> = m
            .areas
            .iter()
            .filter(|a| a.offset.checked_add(a.size).is_some_and(|e| e <= desc.size))
            .collect();
        if !areas.is_empty() {
            flags |= wire::region_flags::CAPS;
            let ch = wire::CapHeader {
                id: wire::REGION_INFO_CAP_SPARSE_MMAP,
                version: 1,
                next: 0,
            };
            cap.extend_from_slice(ch.as_bytes());
            let sh = wire::SparseMmapHead {
                nr_areas: areas.len() as u32,
                reserved: 0,
            };
            cap.extend_from_slice(sh.as_bytes());
            for a in areas {
                cap.extend_from_slice(
                    wire::SparseMmapArea {
                        offset: a.offset,
                        size: a.size,
                    }
                    .as_bytes(),
                );
            }
        }
    }
    let needed = head + cap.len();
    let mut info = wire::RegionInfo {
        argsz: needed as u32,
        flags,
        index: req.index,
        cap_offset: 0,
        size: desc.size,
        offset: file_offset,
    };
    if (req.argsz as usize) < needed {
        // Too small for the caps: report the size needed, no caps, no fd; the client retries.
        // The CAPS flag is cleared too (as libvfio-user does): QEMU rejects CAPS with a
        // cap_offset of 0 ("failed to get region info: Invalid argument") before retrying.
        info.flags &= !wire::region_flags::CAPS;
        return ok(info.as_bytes().to_vec());
    }
    if !cap.is_empty() {
        info.cap_offset = head as u32;
    }
    let mut out = info.as_bytes().to_vec();
    out.extend_from_slice(&cap);
    let fds = desc.mmap.map(|m| vec![m.fd]).unwrap_or_default();
    Ok(Reply::Ok(out, fds))
}

pub(super) fn region_io_fds<D: ServerDevice>(
    dev: &mut D,
    peer: &PeerCaps,
    payload: &[u8],
) -> Result<Reply, Errno> {
    let req: wire::RegionIoFds = read_struct(payload)?;
    let head = std::mem::size_of::<wire::RegionIoFds>();
    if (req.argsz as usize) < head || req.flags != 0 || req.count != 0 {
        return Err(Errno::EINVAL);
    }
    if req.index >= dev.device_desc().num_regions || dev.region(req.index).is_none() {
        return Err(Errno::EINVAL);
    }
    let list = dev.region_io_fds(req.index)?;
    let mut fds: Vec<Arc<OwnedFd>> = Vec::new();
    let mut subs = Vec::with_capacity(list.len());
    for e in &list {
        let idx = match fds.iter().position(|f| Arc::ptr_eq(f, &e.fd)) {
            Some(i) => i,
            None => {
                fds.push(e.fd.clone());
                fds.len() - 1
            }
        };
        subs.push(wire::IoFdSubRegion {
            offset: e.offset,
            size: e.size,
            fd_index: idx as u32,
            kind: wire::iofd::TYPE_IOEVENTFD,
            flags: if e.datamatch.is_some() {
                wire::iofd::FLAG_DATAMATCH
            } else {
                0
            },
            padding: 0,
            datamatch: e.datamatch.unwrap_or(0),
        });
    }
    if fds.len() > peer.max_msg_fds as usize || fds.len() > wire::MAX_MSG_FDS {
        return Err(Errno::E2BIG);
    }
    let needed = head + subs.len() * std::mem::size_of::<wire::IoFdSubRegion>();
    let reply_head = wire::RegionIoFds {
        argsz: needed as u32,
        flags: 0,
        index: req.index,
        count: subs.len() as u32,
    };
    let mut out = reply_head.as_bytes().to_vec();
    if (req.argsz as usize) < needed {
        return ok(out);
    }
    for s in &subs {
        out.extend_from_slice(s.as_bytes());
    }
    Ok(Reply::Ok(out, fds))
}

pub(super) fn irq_info<D: ServerDevice>(dev: &mut D, payload: &[u8]) -> Result<Reply, Errno> {
    let req: wire::IrqInfo = read_struct(payload)?;
    if (req.argsz as usize) < std::mem::size_of::<wire::IrqInfo>() {
        return Err(Errno::EINVAL);
    }
    if req.index >= dev.device_desc().num_irqs {
        return Err(Errno::EINVAL);
    }
    let d = dev.irq(req.index).ok_or(Errno::EINVAL)?;
    let info = wire::IrqInfo {
        argsz: std::mem::size_of::<wire::IrqInfo>() as u32,
        flags: d.flags,
        index: req.index,
        count: d.count,
    };
    ok(info.as_bytes().to_vec())
}

pub(super) fn set_irqs<D: ServerDevice>(
    dev: &mut D,
    payload: &[u8],
    fds: Vec<OwnedFd>,
) -> Result<Reply, Errno> {
    let head = std::mem::size_of::<wire::IrqSet>();
    let req: wire::IrqSet = read_struct(payload)?;
    if (req.argsz as usize) < head {
        return Err(Errno::EINVAL);
    }
    if req.flags & !(isf::DATA_TYPE_MASK | isf::ACTION_TYPE_MASK) != 0 {
        return Err(Errno::EINVAL);
    }
    let data_bits = req.flags & isf::DATA_TYPE_MASK;
    let action_bits = req.flags & isf::ACTION_TYPE_MASK;
    if data_bits.count_ones() != 1 || action_bits.count_ones() != 1 {
        return Err(Errno::EINVAL);
    }
    let action = match action_bits {
        isf::ACTION_MASK => IrqAction::Mask,
        isf::ACTION_UNMASK => IrqAction::Unmask,
        _ => IrqAction::Trigger,
    };
    if req.index >= dev.device_desc().num_irqs {
        return Err(Errno::EINVAL);
    }
    let irq = dev.irq(req.index).ok_or(Errno::EINVAL)?;
    if matches!(req.index, wire::irq_index::ERR | wire::irq_index::REQ)
        && (action != IrqAction::Trigger || req.count > 1)
    {
        return Err(Errno::EINVAL);
    }
    if data_bits != isf::DATA_EVENTFD && !fds.is_empty() {
        return Err(Errno::EINVAL);
    }
    if req.count == 0 {
        // Only "disable the whole index" is meaningful with count 0.
        if req.start != 0 || data_bits != isf::DATA_NONE || action != IrqAction::Trigger {
            return Err(Errno::EINVAL);
        }
        dev.set_irqs(req.index, action, 0, 0, IrqData::None)?;
        return ok(Vec::new());
    }
    let end = req.start.checked_add(req.count).ok_or(Errno::EINVAL)?;
    if end > irq.count {
        return Err(Errno::EINVAL);
    }
    let data = match data_bits {
        isf::DATA_NONE => IrqData::None,
        isf::DATA_BOOL => {
            let bools = &payload[head..];
            if bools.len() != req.count as usize {
                return Err(Errno::EINVAL);
            }
            IrqData::Bool(bools.iter().map(|&b| b != 0).collect())
        }
        _ => {
            if fds.is_empty() {
                IrqData::Eventfds((0..req.count).map(|_| None).collect())
            } else if fds.len() == req.count as usize {
                IrqData::Eventfds(fds.into_iter().map(Some).collect())
            } else {
                log::warn!(
                    "vfio-user: SET_IRQS count {} with {} fds",
                    req.count,
                    fds.len()
                );
                return Err(Errno::EINVAL);
            }
        }
    };
    dev.set_irqs(req.index, action, req.start, req.count, data)?;
    ok(Vec::new())
}

/// Check a region access; returns the region's flags.
pub(super) fn check_access<D: ServerDevice>(
    dev: &D,
    region: u32,
    offset: u64,
    count: u64,
    write: bool,
) -> Result<(), Errno> {
    if count > wire::MAX_DATA_XFER_SIZE as u64 {
        return Err(Errno::EINVAL);
    }
    if region >= dev.device_desc().num_regions {
        return Err(Errno::EINVAL);
    }
    let desc = dev.region(region).ok_or(Errno::EINVAL)?;
    let need = if write {
        wire::region_flags::WRITE
    } else {
        wire::region_flags::READ
    };
    if desc.flags & need == 0 {
        return Err(Errno::EINVAL);
    }
    let end = offset.checked_add(count).ok_or(Errno::EINVAL)?;
    if end > desc.size {
        return Err(Errno::EINVAL);
    }
    Ok(())
}

pub(super) fn region_read<D: ServerDevice>(dev: &mut D, payload: &[u8]) -> Result<Reply, Errno> {
    let req: wire::RegionAccess = read_struct(payload)?;
    if req.count == 0 {
        return ok(req.as_bytes().to_vec());
    }
    check_access(dev, req.region, req.offset, req.count as u64, false)?;
    let head = std::mem::size_of::<wire::RegionAccess>();
    let mut out = vec![0u8; head + req.count as usize];
    out[..head].copy_from_slice(req.as_bytes());
    dev.region_read(req.region, req.offset, &mut out[head..])?;
    ok(out)
}

pub(super) fn region_write<D: ServerDevice>(dev: &mut D, payload: &[u8]) -> Result<Reply, Errno> {
    let req: wire::RegionAccess = read_struct(payload)?;
    let head = std::mem::size_of::<wire::RegionAccess>();
    let data = &payload[head..];
    if data.len() as u64 != req.count as u64 {
        return Err(Errno::EINVAL);
    }
    if req.count == 0 {
        return ok(req.as_bytes().to_vec());
    }
    check_access(dev, req.region, req.offset, req.count as u64, true)?;
    dev.region_write(req.region, req.offset, data)?;
    ok(req.as_bytes().to_vec())
}

pub(super) fn write_multi<D: ServerDevice>(dev: &mut D, payload: &[u8]) -> Result<Reply, Errno> {
    let head: wire::WriteMultiHead = read_struct(payload)?;
    if head.wr_cnt == 0 || head.wr_cnt > wire::MAX_WRITE_MULTI {
        return Err(Errno::EINVAL);
    }
    let esz = std::mem::size_of::<wire::WriteMultiEntry>();
    let body = &payload[std::mem::size_of::<wire::WriteMultiHead>()..];
    if body.len() as u64 != head.wr_cnt * esz as u64 {
        return Err(Errno::EINVAL);
    }
    let mut entries = Vec::with_capacity(head.wr_cnt as usize);
    for chunk in body.chunks_exact(esz) {
        let e = wire::WriteMultiEntry::read_from_bytes(chunk).map_err(|_| Errno::EINVAL)?;
        if e.count == 0 || e.count as usize > e.data.len() {
            return Err(Errno::EINVAL);
        }
        check_access(dev, e.region, e.offset, e.count as u64, true)?;
        entries.push(e);
    }
    for e in &entries {
        dev.region_write(e.region, e.offset, &e.data[..e.count as usize])?;
    }
    ok(head.as_bytes().to_vec())
}
