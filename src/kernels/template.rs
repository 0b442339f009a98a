//! The WGSL templates in `shaders/` and the `{{ name }}` slot filling.

use super::KernelError;

/// Conversions and helpers every kernel starts with.
pub(super) const COMMON: &str = include_str!("../../shaders/common.wgsl");
/// The element-wise template.
pub(super) const ELEMENTWISE: &str = include_str!("../../shaders/elementwise.wgsl");

/// Replaces every `{{ name }}` in `template` with its value in `values`. A slot without a
/// value is an error (a template and its filler disagree).
pub(super) fn fill(
    name: &'static str,
    template: &str,
    values: &[(&str, String)],
) -> Result<String, KernelError> {
    let mut out = String::with_capacity(template.len() + values.iter().map(|(_, v)| v.len()).sum::<usize>());
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let Some(close) = after.find("}}") else {
            return Err(KernelError::Template {
                template: name,
                slot: after.lines().next().unwrap_or_default().to_string(),
            });
        };
        let slot = after[..close].trim();
        let Some((_, value)) = values.iter().find(|(k, _)| *k == slot) else {
            return Err(KernelError::Template {
                template: name,
                slot: slot.to_string(),
            });
        };
        out.push_str(value);
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_every_slot() {
        let out = fill(
            "t",
            "a {{ x }} b {{y}} c {{ x }}",
            &[("x", "1".into()), ("y", "2".into())],
        );
        assert_eq!(out.unwrap(), "a 1 b 2 c 1");
    }

    #[test]
    fn an_unknown_or_open_slot_is_an_error() {
        assert_eq!(
            fill("t", "a {{ z }}", &[]),
            Err(KernelError::Template {
                template: "t",
                slot: "z".into()
            })
        );
        assert!(fill("t", "a {{ z", &[("z", String::new())]).is_err());
    }
}
