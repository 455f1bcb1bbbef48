//! Slurm's compressed host lists and task counts.

/// The first host of a compressed Slurm host list such as `gpu[01-04,07],cpu3` (gives `gpu01`).
///
/// Commas inside brackets do not split hosts; zero padding is kept; several bracket groups
/// (`rack[1-2]-node[05-06]`) each contribute their first value. Returns `None` for a malformed list.
pub(crate) fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    // The first top-level item: split at the first comma outside brackets.
    let mut depth = 0i32;
    let mut end = list.len();
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                end = i;
                break;
            }
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return None;
        }
    }
    let item = &list[..end];
    let mut host = String::new();
    let mut rest = item;
    while let Some(open) = rest.find('[') {
        host.push_str(&rest[..open]);
        let close = rest[open..].find(']')? + open;
        let inner = &rest[open + 1..close];
        let first = inner.split(',').next()?.split('-').next()?.trim();
        if first.is_empty() || !first.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        host.push_str(first);
        rest = &rest[close + 1..];
    }
    if rest.contains(']') {
        return None;
    }
    host.push_str(rest);
    if host.is_empty() {
        None
    } else {
        Some(host)
    }
}

/// Expands `SLURM_TASKS_PER_NODE` (`2(x3),1` means `[2, 2, 2, 1]`). `None` if malformed.
pub(crate) fn tasks_per_node(spec: &str) -> Option<Vec<usize>> {
    let mut out = Vec::new();
    for part in spec.trim().split(',') {
        let (count, times) = match part.split_once("(x") {
            Some((c, rest)) => (c, rest.strip_suffix(')')?.parse::<usize>().ok()?),
            None => (part, 1),
        };
        let count = count.trim().parse::<usize>().ok()?;
        // No real allocation has a million nodes; refuse rather than allocate without bound.
        if out.len() + times > 1_000_000 {
            return None;
        }
        out.extend(std::iter::repeat_n(count, times));
    }
    Some(out)
}

/// The default port rule: `15000 + (last 4 digits of the job id)`. `None` without trailing digits.
pub(crate) fn port_from_job_id(job_id: &str) -> Option<u16> {
    let digits: String = job_id
        .trim()
        .chars()
        .rev()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    if digits.is_empty() {
        return None;
    }
    let last4: String = digits
        .chars()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let n: u16 = last4.parse().ok()?;
    Some(15000 + n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_host_of_compressed_lists() {
        let cases = [
            ("gpu[01-04,07],cpu3", Some("gpu01")),
            ("cpu3,gpu[01-02]", Some("cpu3")),
            ("node7", Some("node7")),
            ("node[7]", Some("node7")),
            ("node[003-010]-ib", Some("node003-ib")),
            ("rack[1-2]-n[05,09]", Some("rack1-n05")),
            (" a1 ", Some("a1")),
            ("gpu[01-04", None),
            ("gpu]01[", None),
            ("gpu[x-y]", None),
            ("", None),
        ];
        for (list, want) in cases {
            assert_eq!(first_host(list).as_deref(), want, "{list:?}");
        }
    }

    #[test]
    fn tasks_per_node_expands_repeats() {
        assert_eq!(tasks_per_node("2(x3),1"), Some(vec![2, 2, 2, 1]));
        assert_eq!(tasks_per_node("4"), Some(vec![4]));
        assert_eq!(tasks_per_node("4(x2"), None);
        assert_eq!(tasks_per_node("a"), None);
        assert_eq!(tasks_per_node("1(x99999999999)"), None);
    }

    #[test]
    fn port_rule_uses_last_four_digits() {
        assert_eq!(port_from_job_id("1234567"), Some(15000 + 4567));
        assert_eq!(port_from_job_id("42"), Some(15042));
        assert_eq!(port_from_job_id("9999"), Some(24999));
        assert_eq!(port_from_job_id("abc"), None);
    }
}
