//! Element types the collectives accept, and how they reduce.

/// How values from different ranks combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Elementwise sum.
    Sum,
    /// Elementwise sum divided by the world size (integer types: truncating division).
    Mean,
    /// Elementwise maximum (a NaN on any rank makes the result NaN).
    Max,
}

mod sealed {
    pub trait Sealed {}
}

/// What the NCCL backend needs of an element type (nothing without the `cuda` feature).
#[cfg(feature = "cuda")]
pub trait DeviceElement: cudarc::nccl::NcclType + cudarc::driver::DeviceRepr {}
#[cfg(feature = "cuda")]
impl<T: cudarc::nccl::NcclType + cudarc::driver::DeviceRepr> DeviceElement for T {}
/// What the NCCL backend needs of an element type (nothing without the `cuda` feature).
#[cfg(not(feature = "cuda"))]
pub trait DeviceElement {}
#[cfg(not(feature = "cuda"))]
impl<T> DeviceElement for T {}

/// A value type that can travel through the collectives: `f32`, `f64`, `i32`, `i64`, `u8`.
///
/// Values travel little-endian. Sealed: the set is fixed by this crate.
pub trait Element: Copy + Default + Send + Sync + 'static + DeviceElement + sealed::Sealed {
    /// A tag carried on the wire so that ranks using different types are caught.
    const DTYPE: u8;
    /// Bytes per value.
    const SIZE: usize;
    /// The Rust name, for error messages.
    const NAME: &'static str;
    /// Appends the little-endian bytes of `src` to `out`.
    fn encode(src: &[Self], out: &mut Vec<u8>);
    /// Overwrites `dst` from little-endian bytes (`bytes.len() == dst.len() * SIZE`).
    fn decode(bytes: &[u8], dst: &mut [Self]);
    /// `dst[i] = incoming[i] (op) dst[i]`: the incoming partial result is the left operand.
    fn reduce(dst: &mut [Self], incoming: &[u8], op: ReduceOp);
    /// Divides every value by `n` (for [`ReduceOp::Mean`]).
    fn divide(dst: &mut [Self], n: usize);
}

macro_rules! float_element {
    ($t:ty, $tag:expr) => {
        impl sealed::Sealed for $t {}
        impl Element for $t {
            const DTYPE: u8 = $tag;
            const SIZE: usize = std::mem::size_of::<$t>();
            const NAME: &'static str = stringify!($t);
            fn encode(src: &[Self], out: &mut Vec<u8>) {
                out.reserve(src.len() * Self::SIZE);
                for v in src {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            fn decode(bytes: &[u8], dst: &mut [Self]) {
                for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(Self::SIZE)) {
                    *d = <$t>::from_le_bytes(b.try_into().expect("chunks_exact yields SIZE bytes"));
                }
            }
            fn reduce(dst: &mut [Self], incoming: &[u8], op: ReduceOp) {
                let it = dst.iter_mut().zip(incoming.chunks_exact(Self::SIZE));
                let val = |b: &[u8]| {
                    <$t>::from_le_bytes(b.try_into().expect("chunks_exact yields SIZE bytes"))
                };
                match op {
                    // IEEE addition is commutative, so this is bitwise `incoming + local`.
                    ReduceOp::Sum | ReduceOp::Mean => it.for_each(|(d, b)| *d += val(b)),
                    ReduceOp::Max => it.for_each(|(d, b)| {
                        let r = val(b);
                        if r.is_nan() || r > *d {
                            *d = r;
                        }
                    }),
                }
            }
            fn divide(dst: &mut [Self], n: usize) {
                let n = n as $t;
                dst.iter_mut().for_each(|d| *d /= n);
            }
        }
    };
}

macro_rules! int_element {
    ($t:ty, $tag:expr) => {
        impl sealed::Sealed for $t {}
        impl Element for $t {
            const DTYPE: u8 = $tag;
            const SIZE: usize = std::mem::size_of::<$t>();
            const NAME: &'static str = stringify!($t);
            fn encode(src: &[Self], out: &mut Vec<u8>) {
                out.reserve(src.len() * Self::SIZE);
                for v in src {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            fn decode(bytes: &[u8], dst: &mut [Self]) {
                for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(Self::SIZE)) {
                    *d = <$t>::from_le_bytes(b.try_into().expect("chunks_exact yields SIZE bytes"));
                }
            }
            fn reduce(dst: &mut [Self], incoming: &[u8], op: ReduceOp) {
                let it = dst.iter_mut().zip(incoming.chunks_exact(Self::SIZE));
                let val = |b: &[u8]| {
                    <$t>::from_le_bytes(b.try_into().expect("chunks_exact yields SIZE bytes"))
                };
                match op {
                    ReduceOp::Sum | ReduceOp::Mean => {
                        it.for_each(|(d, b)| *d = val(b).wrapping_add(*d))
                    }
                    ReduceOp::Max => it.for_each(|(d, b)| *d = val(b).max(*d)),
                }
            }
            fn divide(dst: &mut [Self], n: usize) {
                let n = <$t>::try_from(n).unwrap_or(<$t>::MAX);
                dst.iter_mut().for_each(|d| *d /= n);
            }
        }
    };
}

float_element!(f32, 1);
float_element!(f64, 2);
int_element!(i32, 3);
int_element!(i64, 4);
int_element!(u8, 5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_and_reduce() {
        let a = [1.5f32, -2.0, f32::MAX];
        let mut bytes = Vec::new();
        f32::encode(&a, &mut bytes);
        let mut back = [0f32; 3];
        f32::decode(&bytes, &mut back);
        assert_eq!(a, back);
        let mut d = [1.0f32, 5.0, 0.0];
        f32::reduce(&mut d, &bytes, ReduceOp::Max);
        assert_eq!(d, [1.5, 5.0, f32::MAX]);
        let mut n = [1.0f64];
        let mut nan = Vec::new();
        f64::encode(&[f64::NAN], &mut nan);
        f64::reduce(&mut n, &nan, ReduceOp::Max);
        assert!(n[0].is_nan());
        let mut i = [7i64, 9];
        i64::divide(&mut i, 2);
        assert_eq!(i, [3, 4]);
    }
}
