//! Character code tables selected by `ESC t n`, mapped to decoders.
//!
//! ESC/POS printers power up in PC437 and switch with `ESC t n`. The numbering below is Epson's
//! (TM-T88 and compatibles; most clones follow it). DOS/OEM pages come from `oem_cp`, Windows and ISO
//! pages from `encoding_rs`; pages neither crate has (Katakana, Thai 42, TCVN-3, user-defined) decode
//! their upper half as U+FFFD so that an unknown page never corrupts the ASCII text around it.

use encoding_rs::Encoding;
use oem_cp::code_table_type::TableType;

/// A decoder for one code page.
#[derive(Debug, Clone, Copy)]
pub enum CodePage {
    Oem(u16),
    Whatwg(&'static Encoding),
    /// A page this agent cannot decode: ASCII passes, the upper half becomes U+FFFD.
    AsciiOnly(u8),
}

impl CodePage {
    /// The page a printer uses after power-on or `ESC @`.
    pub const DEFAULT: CodePage = CodePage::Oem(437);

    /// The page an `ESC t n` selects.
    pub fn from_esc_t(n: u8) -> CodePage {
        match n {
            0 => CodePage::Oem(437),
            2 => CodePage::Oem(850),
            3 => CodePage::Oem(860),
            4 => CodePage::Oem(863),
            5 => CodePage::Oem(865),
            13 => CodePage::Oem(857),
            14 => CodePage::Oem(737),
            15 => CodePage::Whatwg(encoding_rs::ISO_8859_7),
            16 => CodePage::Whatwg(encoding_rs::WINDOWS_1252),
            17 => CodePage::Oem(866),
            18 => CodePage::Oem(852),
            19 => CodePage::Oem(858),
            32 => CodePage::Oem(720),
            33 => CodePage::Whatwg(encoding_rs::WINDOWS_1257), // WPC775 is close to 1257 in the upper half
            34 => CodePage::Oem(855),
            35 => CodePage::Oem(861),
            36 => CodePage::Oem(862),
            37 => CodePage::Oem(864),
            38 => CodePage::Oem(869),
            39 => CodePage::Whatwg(encoding_rs::ISO_8859_2),
            40 => CodePage::Whatwg(encoding_rs::ISO_8859_15),
            45 => CodePage::Whatwg(encoding_rs::WINDOWS_1250),
            46 => CodePage::Whatwg(encoding_rs::WINDOWS_1251),
            47 => CodePage::Whatwg(encoding_rs::WINDOWS_1253),
            48 => CodePage::Whatwg(encoding_rs::WINDOWS_1254),
            49 => CodePage::Whatwg(encoding_rs::WINDOWS_1255),
            50 => CodePage::Whatwg(encoding_rs::WINDOWS_1256),
            51 => CodePage::Whatwg(encoding_rs::WINDOWS_1257),
            52 => CodePage::Whatwg(encoding_rs::WINDOWS_1258),
            other => CodePage::AsciiOnly(other),
        }
    }

    /// A page named in config: `cp437`, `cp858`, `windows-1252`, `iso-8859-15`, `shift_jis`, `gbk`...
    pub fn from_name(name: &str) -> Option<CodePage> {
        let lower = name.trim().to_ascii_lowercase();
        if let Some(num) = lower
            .strip_prefix("cp")
            .or_else(|| lower.strip_prefix("pc"))
            .and_then(|n| n.parse::<u16>().ok())
        {
            if oem_cp::code_table::DECODING_TABLE_CP_MAP.contains_key(&num) {
                return Some(CodePage::Oem(num));
            }
            return Encoding::for_label(format!("windows-{num}").as_bytes()).map(CodePage::Whatwg);
        }
        Encoding::for_label(lower.as_bytes()).map(CodePage::Whatwg)
    }

    pub fn name(&self) -> String {
        match self {
            CodePage::Oem(n) => format!("cp{n}"),
            CodePage::Whatwg(e) => e.name().to_ascii_lowercase(),
            CodePage::AsciiOnly(n) => format!("esc-t-{n}"),
        }
    }

    /// Appends the decoded text of `bytes` to `out`. Never fails: undecodable bytes become U+FFFD.
    pub fn decode_into(&self, bytes: &[u8], out: &mut String) {
        match self {
            CodePage::Oem(n) => match oem_cp::code_table::DECODING_TABLE_CP_MAP.get(n) {
                Some(TableType::Complete(t)) => out.extend(bytes.iter().map(|&b| {
                    if b < 0x80 {
                        b as char
                    } else {
                        t[usize::from(b - 0x80)]
                    }
                })),
                Some(TableType::Incomplete(t)) => out.extend(bytes.iter().map(|&b| {
                    if b < 0x80 {
                        b as char
                    } else {
                        t[usize::from(b - 0x80)].unwrap_or('\u{FFFD}')
                    }
                })),
                None => ascii_only(bytes, out),
            },
            CodePage::Whatwg(e) => {
                let (text, _) = e.decode_without_bom_handling(bytes);
                out.push_str(&text);
            }
            CodePage::AsciiOnly(_) => ascii_only(bytes, out),
        }
    }
}

fn ascii_only(bytes: &[u8], out: &mut String) {
    out.extend(
        bytes
            .iter()
            .map(|&b| if b < 0x80 { b as char } else { '\u{FFFD}' }),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(cp: CodePage, b: &[u8]) -> String {
        let mut s = String::new();
        cp.decode_into(b, &mut s);
        s
    }

    #[test]
    fn printer_pages_decode_their_upper_half() {
        // PC437: 0x9C is the pound sign, 0x81 u-umlaut.
        assert_eq!(dec(CodePage::from_esc_t(0), b"\x9c5 M\x81sli"), "£5 Müsli");
        // PC858: 0xD5 is the euro sign.
        assert_eq!(dec(CodePage::from_esc_t(19), b"\xd5 2,50"), "€ 2,50");
        // WPC1252: 0x80 is the euro sign, 0xE9 e-acute.
        assert_eq!(dec(CodePage::from_esc_t(16), b"\x80 Caf\xe9"), "€ Café");
        // PC866 Cyrillic.
        assert_eq!(dec(CodePage::from_esc_t(17), b"\x90\xa8\xe1"), "Рис");
        // An unknown page keeps ASCII and marks the rest.
        assert_eq!(dec(CodePage::from_esc_t(200), b"A\xffB"), "A\u{FFFD}B");
    }

    #[test]
    fn config_names_resolve() {
        assert!(matches!(
            CodePage::from_name("cp858"),
            Some(CodePage::Oem(858))
        ));
        assert!(matches!(
            CodePage::from_name("PC437"),
            Some(CodePage::Oem(437))
        ));
        assert_eq!(
            CodePage::from_name("cp1252").map(|c| c.name()),
            Some("windows-1252".into())
        );
        assert_eq!(
            CodePage::from_name("shift_jis").map(|c| c.name()),
            Some("shift_jis".into())
        );
        assert!(CodePage::from_name("klingon").is_none());
    }
}
