//! Run health: a loss-spike detector (logs, never stops the run) and the NaN/Inf step check.

/// Flags a step whose loss exceeds `factor` × the running mean of the previous losses
/// (exponential, weight 0.9 on the past) once `WARMUP` steps have been seen.
#[derive(Debug, Clone)]
pub struct SpikeDetector {
    factor: f64,
    mean: Option<f64>,
    seen: u64,
    /// Spikes flagged so far.
    pub spikes: u64,
}

const WARMUP: u64 = 10;
const DECAY: f64 = 0.9;

impl SpikeDetector {
    /// A detector with threshold `factor` (0 or less: off).
    pub fn new(factor: f64) -> Self {
        SpikeDetector {
            factor,
            mean: None,
            seen: 0,
            spikes: 0,
        }
    }

    /// Feeds one step's loss; returns the running mean it was compared with when it is a spike.
    /// Non-finite losses are neither flagged here nor folded into the mean (the non-finite
    /// policy handles them).
    pub fn observe(&mut self, loss: f64) -> Option<f64> {
        if !loss.is_finite() {
            return None;
        }
        let prev = self.mean;
        self.seen += 1;
        self.mean = Some(prev.map_or(loss, |m| DECAY * m + (1.0 - DECAY) * loss));
        match prev {
            Some(m) if self.factor > 0.0 && self.seen > WARMUP && loss > self.factor * m => {
                self.spikes += 1;
                Some(m)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_a_jump_after_warmup_only() {
        let mut d = SpikeDetector::new(3.0);
        // A jump during warm-up is not flagged.
        assert_eq!(d.observe(2.0), None);
        assert_eq!(d.observe(9.0), None);
        for _ in 0..20 {
            assert_eq!(d.observe(1.0), None);
        }
        let m = d.observe(10.0).expect("spike");
        assert!((1.0..1.5).contains(&m), "{m}");
        assert_eq!(d.spikes, 1);
        // Falling losses never are.
        assert_eq!(d.observe(0.1), None);
    }

    #[test]
    fn off_and_non_finite() {
        let mut d = SpikeDetector::new(0.0);
        for _ in 0..20 {
            d.observe(1.0);
        }
        assert_eq!(d.observe(100.0), None);
        let mut d = SpikeDetector::new(3.0);
        for _ in 0..20 {
            d.observe(1.0);
        }
        assert_eq!(d.observe(f64::NAN), None);
        assert_eq!(d.observe(f64::INFINITY), None);
        assert_eq!(d.spikes, 0);
    }
}
