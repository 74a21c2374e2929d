//! POSIX `getopt` with GNU argument permutation, as qemu-io's commands use
//! it: options may follow operands, `--` ends the options.

/// One option event, in command-line order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opt {
    /// An option without argument.
    Flag(char),
    /// An option with its argument.
    Arg(char, String),
    /// A character not in the option string.
    Invalid(char),
    /// An option that needs an argument, at the end of the line.
    MissingArg(char),
}

/// Splits `args` (without the command name) into option events and
/// operands. `spec` lists option characters, each followed by `:` when it
/// takes an argument.
pub fn getopt(args: &[String], spec: &str) -> (Vec<Opt>, Vec<String>) {
    let takes_arg = |c: char| -> Option<bool> {
        if c == ':' {
            return None;
        }
        let at = spec.find(c)?;
        Some(spec[at + c.len_utf8()..].starts_with(':'))
    };
    let mut opts = Vec::new();
    let mut operands = Vec::new();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        if arg == "--" {
            operands.extend(iter.by_ref().cloned());
            break;
        }
        let Some(cluster) = arg.strip_prefix('-').filter(|rest| !rest.is_empty()) else {
            operands.push(arg.clone());
            continue;
        };
        for (at, c) in cluster.char_indices() {
            match takes_arg(c) {
                None => opts.push(Opt::Invalid(c)),
                Some(false) => opts.push(Opt::Flag(c)),
                Some(true) => {
                    let rest = &cluster[at + c.len_utf8()..];
                    if !rest.is_empty() {
                        opts.push(Opt::Arg(c, rest.to_string()));
                    } else if let Some(next) = iter.next() {
                        opts.push(Opt::Arg(c, next.clone()));
                    } else {
                        opts.push(Opt::MissingArg(c));
                    }
                    break;
                }
            }
        }
    }
    (opts, operands)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(line: &str) -> (Vec<Opt>, Vec<String>) {
        let args: Vec<String> = line.split_whitespace().map(String::from).collect();
        getopt(&args, "Cl:pP:qs:v")
    }

    #[test]
    fn clusters_and_arguments() {
        let (o, rest) = run("-qv -P0x11 -l 4 0 4k");
        assert_eq!(
            o,
            vec![
                Opt::Flag('q'),
                Opt::Flag('v'),
                Opt::Arg('P', "0x11".into()),
                Opt::Arg('l', "4".into())
            ]
        );
        assert_eq!(rest, ["0", "4k"]);
    }

    #[test]
    fn permutes_and_stops_at_double_dash() {
        let (o, rest) = run("0 1 -q");
        assert_eq!(o, vec![Opt::Flag('q')]);
        assert_eq!(rest, ["0", "1"]);
        let (o, rest) = run("0 -- -5 -q");
        assert!(o.is_empty());
        assert_eq!(rest, ["0", "-5", "-q"]);
        let (_, rest) = run("- 1");
        assert_eq!(rest, ["-", "1"]);
    }

    #[test]
    fn errors() {
        assert_eq!(run("-x 0 1").0, vec![Opt::Invalid('x')]);
        assert_eq!(run("0 1 -P").0, vec![Opt::MissingArg('P')]);
        assert_eq!(run("-: 0 1").0, vec![Opt::Invalid(':')]);
    }
}
