//! Plain-text tables like Docker's: upper-case headers, columns padded to the widest cell,
//! separated by three spaces.

/// Renders `rows` under `headers`.
pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        for (i, cell) in cells.iter().enumerate() {
            out.push_str(cell);
            if i < last {
                let pad = widths[i] - cell.chars().count() + 3;
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push('\n');
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(|s| s.as_str()).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align() {
        let t = render(
            &["NAME", "TASKS"],
            &[
                vec!["web".into(), "2/2".into()],
                vec!["mqtt-broker".into(), "1/1".into()],
            ],
        );
        assert_eq!(
            t,
            "NAME          TASKS\nweb           2/2\nmqtt-broker   1/1\n"
        );
    }
}
