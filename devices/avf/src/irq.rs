//! Per-vector interrupt model (avf-device.md §5.6): edge events, auto-mask on fire,
//! re-armed by INTENA in DYN_CTL; vector 0 also gated by ICR0_ENA1.ADMINQ.

use std::sync::{Arc, Mutex, PoisonError};

use emudev::pci::{Delivery, Msix};

use crate::regs;

#[derive(Debug, Default)]
struct State {
    armed: Vec<bool>,
    pending: Vec<bool>,
    icr0_ena: u32,
    fired: u64,
}

/// Interrupt state of all vectors, shared by the control thread and the worker.
#[derive(Debug)]
pub struct Irqs {
    msix: Option<Arc<Msix>>,
    state: Mutex<State>,
}

impl Irqs {
    pub fn new(msix: Option<Arc<Msix>>, vectors: u16) -> Self {
        let n = usize::from(vectors);
        Self {
            msix,
            state: Mutex::new(State {
                armed: vec![false; n],
                pending: vec![false; n],
                ..State::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An event on `vector` (ARQ delivery for 0, queue write-back for the others).
    pub fn event(&self, vector: u16) {
        let mut s = self.lock();
        let v = usize::from(vector);
        if v >= s.pending.len() {
            return;
        }
        s.pending[v] = true;
        self.evaluate(&mut s, v);
    }

    /// A DYN_CTL write for `vector`.
    pub fn dyn_ctl(&self, vector: u16, value: u32) {
        let mut s = self.lock();
        let v = usize::from(vector);
        if v >= s.armed.len() {
            return;
        }
        if value & regs::DYN_CTL_INTENA_MSK == 0 {
            s.armed[v] = value & regs::DYN_CTL_INTENA != 0;
        }
        if value & regs::DYN_CTL_SWINT_TRIG != 0 {
            s.pending[v] = true;
        }
        self.evaluate(&mut s, v);
    }

    /// A write of ICR0_ENA1.
    pub fn set_icr0_ena(&self, value: u32) {
        let mut s = self.lock();
        s.icr0_ena = value & !(1 << 31);
        self.evaluate(&mut s, 0);
    }

    pub fn icr0_ena(&self) -> u32 {
        self.lock().icr0_ena
    }

    /// Interrupts fired (MSI-X triggers issued) since creation.
    pub fn fired(&self) -> u64 {
        self.lock().fired
    }

    /// Back to reset state: all disarmed, nothing pending, ICR0_ENA1 = 0.
    pub fn reset(&self) {
        let mut s = self.lock();
        s.armed.iter_mut().for_each(|a| *a = false);
        s.pending.iter_mut().for_each(|p| *p = false);
        s.icr0_ena = 0;
    }

    fn evaluate(&self, s: &mut State, v: usize) {
        let gated = v == 0 && s.icr0_ena & regs::ICR0_ADMINQ == 0;
        if !(s.armed[v] && s.pending[v]) || gated {
            return;
        }
        let Some(msix) = &self.msix else { return };
        // A trigger without a deliverable route leaves the PBA bit set; the MSI-X model
        // fires it when the route appears, so disarming is safe either way.
        match msix.trigger(v as u16) {
            Ok(Delivery::Fired) | Ok(Delivery::Pending) => {
                s.armed[v] = false;
                s.pending[v] = false;
                s.fired += 1;
            }
            Err(e) => log::debug!("avf: MSI-X vector {v}: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(i: &Irqs, v: usize) -> (bool, bool) {
        let s = i.lock();
        (s.armed[v], s.pending[v])
    }

    #[test]
    fn automask_and_rearm() {
        let msix = Arc::new(Msix::new(3).unwrap_or_else(|e| panic!("{e}")));
        let irqs = Irqs::new(Some(msix), 3);
        irqs.event(1);
        assert_eq!(st(&irqs, 1), (false, true), "not armed: pending kept");
        irqs.dyn_ctl(1, regs::DYN_CTL_INTENA | (3 << 3));
        assert_eq!(irqs.fired(), 1, "re-arm with pending fires");
        assert_eq!(st(&irqs, 1), (false, false), "fired vector is auto-masked");
        irqs.event(1);
        assert_eq!(irqs.fired(), 1);
        irqs.dyn_ctl(1, regs::DYN_CTL_INTENA | regs::DYN_CTL_INTENA_MSK);
        assert_eq!(irqs.fired(), 1, "INTENA_MSK ignores INTENA");
        irqs.dyn_ctl(1, regs::DYN_CTL_INTENA);
        assert_eq!(irqs.fired(), 2);
        irqs.dyn_ctl(2, regs::DYN_CTL_INTENA | regs::DYN_CTL_SWINT_TRIG);
        assert_eq!(irqs.fired(), 3, "SWINT_TRIG fires");
    }

    #[test]
    fn vector0_gated_by_icr0_ena() {
        let msix = Arc::new(Msix::new(2).unwrap_or_else(|e| panic!("{e}")));
        let irqs = Irqs::new(Some(msix), 2);
        irqs.dyn_ctl(0, 0x19);
        irqs.event(0);
        assert_eq!(irqs.fired(), 0);
        irqs.set_icr0_ena(regs::ICR0_ADMINQ);
        assert_eq!(irqs.fired(), 1);
        irqs.event(9); // out of range: ignored
        assert_eq!(irqs.fired(), 1);
    }
}
