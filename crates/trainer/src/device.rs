//! Device selection: `"cpu"`, `"cuda"`, `"cuda:N"`.

/// A parsed `train.device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The CPU backend (burn's Flex).
    Cpu,
    /// CUDA device N (or the local rank's device when launched with several processes per node).
    Cuda(Option<usize>),
}

impl DeviceSpec {
    /// Parses `"cpu"`, `"cuda"` or `"cuda:N"`.
    ///
    /// # Errors
    /// Anything else, with a message listing the accepted forms.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(None)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceSpec::Cuda(Some(n))),
                _ => Err(format!(
                    "expected \"cpu\", \"cuda\" or \"cuda:N\", got {s:?}"
                )),
            },
        }
    }
}

/// Whether the CUDA driver library can be loaded on this machine (false when built without CUDA).
#[cfg_attr(feature = "cuda", allow(unsafe_code))]
pub fn cuda_available() -> bool {
    #[cfg(feature = "cuda")]
    {
        // SAFETY: this only tries to dlopen the CUDA driver library and reports whether it loaded;
        // no CUDA function is called and no state is shared with other threads.
        unsafe { cudarc::driver::sys::is_culib_present() }
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms_and_rejects_others() {
        assert_eq!(DeviceSpec::parse("cpu"), Ok(DeviceSpec::Cpu));
        assert_eq!(DeviceSpec::parse("cuda"), Ok(DeviceSpec::Cuda(None)));
        assert_eq!(DeviceSpec::parse("cuda:3"), Ok(DeviceSpec::Cuda(Some(3))));
        assert!(DeviceSpec::parse("gpu").is_err());
        assert!(DeviceSpec::parse("cuda:x").is_err());
    }
}
