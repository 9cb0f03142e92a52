//! Turning qmail-remote's exit status and output into the report qmail-send
//! reads: a K, Z or D letter and the text, exactly as qmail's spawner does.

/// Build the report (without delivery number and final NUL) for a child
/// that ended with wait status `wstat` after printing `output`.
pub fn build(wstat: i32, output: &[u8]) -> Vec<u8> {
    if libc::WIFSIGNALED(wstat) {
        return b"Zqmail-remote crashed.\n".to_vec();
    }
    match libc::WEXITSTATUS(wstat) {
        0 => {}
        111 => return b"ZUnable to run qmail-remote.\n".to_vec(),
        _ => return b"DUnable to run qmail-remote.\n".to_vec(),
    }
    if output.is_empty() {
        return b"Zqmail-remote produced no output.\n".to_vec();
    }
    from_output(output)
}

/// Outcome of the delivery: 1 success, 0 temporary, -1 permanent.
type Outcome = i8;

fn from_output(s: &[u8]) -> Vec<u8> {
    let result = final_outcome(s);
    let recipient = match s[0] {
        b's' => 0,
        b'h' => -1,
        _ => result,
    };
    let mut report = Vec::with_capacity(s.len() + 1);
    report.push(match recipient {
        1 => b'K',
        0 => b'Z',
        _ => b'D',
    });
    // The text of the first piece; then, unless the recipient's own result is
    // worse than the final one, the text of the final message that follows.
    let Some(nul) = s[1..].iter().position(|&b| b == 0).map(|p| p + 1) else {
        return report;
    };
    report.extend_from_slice(&s[1..nul]);
    let next = nul + 1;
    if result <= recipient && next < s.len() && matches!(s[next], b'K' | b'Z' | b'D') {
        report.extend_from_slice(until_nul(&s[next + 1..]));
    }
    report
}

/// The outcome named by the first NUL-terminated piece starting with K, Z or
/// D; a D piece or no such piece means permanent.
fn final_outcome(s: &[u8]) -> Outcome {
    let mut start = 0;
    for (k, &b) in s.iter().enumerate() {
        if b != 0 {
            continue;
        }
        match s[start] {
            b'K' => return 1,
            b'Z' => return 0,
            b'D' => return -1,
            _ => start = k + 1,
        }
    }
    -1
}

fn until_nul(s: &[u8]) -> &[u8] {
    let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exited(code: i32) -> i32 {
        code << 8
    }

    fn report(output: &[u8]) -> String {
        String::from_utf8_lossy(&build(exited(0), output)).into_owned()
    }

    #[test]
    fn exit_status_comes_first() {
        assert_eq!(build(9, b"r\0Kok\n\0"), b"Zqmail-remote crashed.\n");
        assert_eq!(build(exited(111), b""), b"ZUnable to run qmail-remote.\n");
        assert_eq!(build(exited(100), b""), b"DUnable to run qmail-remote.\n");
        assert_eq!(build(exited(1), b""), b"DUnable to run qmail-remote.\n");
        assert_eq!(
            build(exited(0), b""),
            b"Zqmail-remote produced no output.\n"
        );
    }

    #[test]
    fn accepted_recipient_takes_the_final_text() {
        assert_eq!(
            report(b"r\0K1.2.3.4 accepted message.\n\0"),
            "K1.2.3.4 accepted message.\n"
        );
        assert_eq!(report(b"r\0Zconnection died.\n\0"), "Zconnection died.\n");
        assert_eq!(report(b"r\0Dfailed on DATA.\n\0"), "Dfailed on DATA.\n");
    }

    #[test]
    fn refused_recipient_keeps_its_own_text() {
        assert_eq!(
            report(b"h1.2.3.4 no.\n\0DGiving up.\n\0"),
            "D1.2.3.4 no.\nGiving up.\n"
        );
        assert_eq!(
            report(b"s1.2.3.4 later.\n\0DGiving up.\n\0"),
            "Z1.2.3.4 later.\nGiving up.\n"
        );
        assert_eq!(report(b"h1.2.3.4 no.\n\0Kaccepted.\n\0"), "D1.2.3.4 no.\n");
        assert_eq!(
            report(b"s1.2.3.4 later.\n\0ZGiving up.\n\0"),
            "Z1.2.3.4 later.\nGiving up.\n"
        );
    }

    #[test]
    fn whole_message_failure_without_recipient_piece() {
        assert_eq!(report(b"ZSorry, no SMTP.\n\0"), "ZSorry, no SMTP.\n");
        assert_eq!(report(b"DBad host.\n\0"), "DBad host.\n");
    }

    #[test]
    fn odd_output_is_read_as_qmail_reads_it() {
        assert_eq!(report(b"no nul at all"), "D");
        assert_eq!(report(b"x\0"), "D");
        assert_eq!(report(b"r\0Kunterminated"), "Dunterminated");
        assert_eq!(report(b"\0\0Kok\0"), "Kok");
    }

    #[test]
    fn long_output_is_passed_through_whole() {
        let mut output = b"r\0K".to_vec();
        output.extend(std::iter::repeat_n(b'x', 100_000));
        output.push(0);
        assert_eq!(build(exited(0), &output).len(), 100_001);
    }
}
