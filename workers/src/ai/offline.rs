//! The offline provider: deterministic answers made locally, without any network.
//!
//! It serves two models, [`CHAT_MODEL`] (`offline-chat`) and [`IMAGE_MODEL`] (`offline-image`),
//! so that the platform can be run and tested end to end without an AI provider or an API key.
//! Its usage figures follow [`tokens`] exactly, so they equal the estimates.

use sha2::{Digest, Sha256};

use super::{AiError, ChatReply, ChatRequest, ImageReply, ImageRequest, Usage, tokens};

/// The provider name the offline provider reports.
pub const PROVIDER_NAME: &str = "offline";
/// The offline chat model.
pub const CHAT_MODEL: &str = "offline-chat";
/// The offline image model.
pub const IMAGE_MODEL: &str = "offline-image";
/// Largest width and height of an offline image; larger requested sides are reduced to this.
pub const MAX_SIDE: u32 = 512;
/// Side of the images made for the size `"auto"`.
pub const AUTO_SIDE: u32 = 256;
/// Most images one offline request may ask for.
pub const MAX_IMAGES: u32 = 10;

/// How much of the last user message the offline chat reply quotes, in characters.
const QUOTE_CHARS: usize = 200;

/// Answers a chat request locally.
///
/// The reply is `"[offline model <model>] You said: <the first 200 characters of the last user
/// message>. (This reply was generated locally by Tally's offline provider; no AI model was
/// called.)"`, cut to `max_tokens * 4` characters when `max_tokens` is set so that the output
/// never counts more than `max_tokens` tokens. Usage: input is
/// [`tokens::count_messages`] of the messages, output is [`tokens::count`] of the reply.
pub fn chat(req: &ChatRequest) -> ChatReply {
    let said: String = req
        .messages
        .iter()
        .rev()
        .find(|message| message.role == "user")
        .map(|message| message.content.chars().take(QUOTE_CHARS).collect())
        .unwrap_or_default();
    let mut content = format!(
        "[offline model {}] You said: {said}. (This reply was generated locally by Tally's \
         offline provider; no AI model was called.)",
        req.model
    );
    if let Some(max_tokens) = req.max_tokens {
        let keep = usize::try_from(u64::from(max_tokens).saturating_mul(tokens::CHARS_PER_TOKEN))
            .unwrap_or(usize::MAX);
        if content.chars().count() > keep {
            content = content.chars().take(keep).collect();
        }
    }
    let usage = Usage {
        input_tokens: tokens::count_messages(&req.messages),
        output_tokens: tokens::count(&content),
    };
    ChatReply {
        content,
        usage,
        provider: PROVIDER_NAME.to_string(),
        model: req.model.clone(),
    }
}

/// Draws `req.n` PNG images locally: a two-colour gradient with stripes, derived from a SHA-256
/// of the prompt and the image's index, so the same request always gives the same bytes.
///
/// `req.size` is `"<width>x<height>"` (or `"auto"`, [`AUTO_SIDE`] square); each side is reduced
/// to at most [`MAX_SIDE`]. A malformed size, a zero side, or an `n` outside `1..=`[`MAX_IMAGES`]
/// is [`AiError::Rejected`].
pub fn image(req: &ImageRequest) -> Result<ImageReply, AiError> {
    let (width, height) = parse_size(&req.size)?;
    if req.n == 0 || req.n > MAX_IMAGES {
        return Err(AiError::Rejected(format!(
            "{PROVIDER_NAME}: n must be between 1 and {MAX_IMAGES}, not {}",
            req.n
        )));
    }
    let images = (0..req.n)
        .map(|index| render(&req.prompt, index, width, height))
        .collect();
    Ok(ImageReply {
        images,
        content_type: "image/png".to_string(),
        provider: PROVIDER_NAME.to_string(),
        model: req.model.clone(),
    })
}

/// Parses `"<width>x<height>"` (or `"auto"`) and caps each side at [`MAX_SIDE`].
fn parse_size(size: &str) -> Result<(u32, u32), AiError> {
    let size = size.trim();
    if size.eq_ignore_ascii_case("auto") {
        return Ok((AUTO_SIDE, AUTO_SIDE));
    }
    let invalid = || {
        AiError::Rejected(format!(
            "{PROVIDER_NAME}: size must look like \"256x256\", not {size:?}"
        ))
    };
    let (width, height) = size.split_once(['x', 'X']).ok_or_else(invalid)?;
    let width: u32 = width.trim().parse().map_err(|_| invalid())?;
    let height: u32 = height.trim().parse().map_err(|_| invalid())?;
    if width == 0 || height == 0 {
        return Err(invalid());
    }
    Ok((width.min(MAX_SIDE), height.min(MAX_SIDE)))
}

/// One deterministic picture as a PNG.
fn render(prompt: &str, index: u32, width: u32, height: u32) -> Vec<u8> {
    let digest = Sha256::new()
        .chain_update(prompt.as_bytes())
        .chain_update(index.to_be_bytes())
        .finalize();
    let from = [digest[0], digest[1], digest[2]];
    let to = [digest[3], digest[4], digest[5]];
    let direction = digest[6] % 3;
    let stripe = 8 + u32::from(digest[7] % 32);
    let span = match direction {
        0 => width - 1,
        1 => height - 1,
        _ => width + height - 2,
    }
    .max(1);

    let mut rgb = Vec::with_capacity(width as usize * height as usize * 3);
    for y in 0..height {
        for x in 0..width {
            let position = match direction {
                0 => x,
                1 => y,
                _ => x + y,
            };
            let t = position * 255 / span;
            let dark = ((x + 2 * y) / stripe) % 2 == 1;
            for channel in 0..3 {
                let mut value =
                    (u32::from(from[channel]) * (255 - t) + u32::from(to[channel]) * t) / 255;
                if dark {
                    value = value * 7 / 8;
                }
                // `value` is at most 255 by construction.
                rgb.push(u8::try_from(value).unwrap_or(u8::MAX));
            }
        }
    }
    encode_png(width, height, &rgb)
}

/// The eight bytes every PNG starts with.
const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];

/// Encodes 8-bit RGB pixels (`width * height * 3` bytes, rows top to bottom) as a PNG: the
/// signature, `IHDR`, one `IDAT` holding a zlib stream of stored (uncompressed) deflate blocks,
/// and `IEND`.
fn encode_png(width: u32, height: u32, rgb: &[u8]) -> Vec<u8> {
    let row = (width as usize * 3).max(1);
    let mut raw = Vec::with_capacity(rgb.len() + height as usize);
    for line in rgb.chunks_exact(row) {
        raw.push(0); // filter type: none
        raw.extend_from_slice(line);
    }

    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    // Bit depth 8, colour type 2 (truecolour), deflate, adaptive filtering, no interlace.
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);

    let idat = zlib_stored(&raw);
    let mut png = Vec::with_capacity(PNG_SIGNATURE.len() + 3 * 12 + ihdr.len() + idat.len());
    png.extend_from_slice(&PNG_SIGNATURE);
    write_chunk(&mut png, b"IHDR", &ihdr);
    write_chunk(&mut png, b"IDAT", &idat);
    write_chunk(&mut png, b"IEND", &[]);
    png
}

/// Appends one PNG chunk: length, type, data, and the CRC-32 of type and data.
fn write_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    // Chunks here are well under 4 GiB (at most 512 * 512 * 3 bytes plus framing).
    let length = u32::try_from(data.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32_update(crc32_update(0xFFFF_FFFF, kind), data) ^ 0xFFFF_FFFF;
    out.extend_from_slice(&crc.to_be_bytes());
}

/// Largest payload of one stored deflate block.
const STORED_BLOCK: usize = 0xFFFF;

/// A zlib stream (RFC 1950) of stored deflate blocks (RFC 1951 §3.2.4) holding `data`.
fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let blocks = data.len().div_ceil(STORED_BLOCK).max(1);
    let mut out = Vec::with_capacity(2 + blocks * 5 + data.len() + 4);
    // CMF: deflate with a 32 KiB window; FLG: no dictionary, check bits making 0x7801 % 31 == 0.
    out.extend_from_slice(&[0x78, 0x01]);
    if data.is_empty() {
        out.extend_from_slice(&[1, 0x00, 0x00, 0xFF, 0xFF]);
    }
    let mut chunks = data.chunks(STORED_BLOCK).peekable();
    while let Some(block) = chunks.next() {
        let last = chunks.peek().is_none();
        out.push(u8::from(last)); // BFINAL, BTYPE 00 (stored)
        let length = u16::try_from(block.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&length.to_le_bytes());
        out.extend_from_slice(&(!length).to_le_bytes());
        out.extend_from_slice(block);
    }
    out.extend_from_slice(&adler32(data).to_be_bytes());
    out
}

/// The CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320) lookup table.
const CRC_TABLE: [u32; 256] = crc_table();

const fn crc_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut n = 0;
    while n < 256 {
        let mut c = n as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[n] = c;
        n += 1;
    }
    table
}

/// Feeds `bytes` into a running CRC-32 register (start with `0xFFFF_FFFF`, finish with `^
/// 0xFFFF_FFFF`).
fn crc32_update(crc: u32, bytes: &[u8]) -> u32 {
    bytes.iter().fold(crc, |c, &byte| {
        CRC_TABLE[((c ^ u32::from(byte)) & 0xFF) as usize] ^ (c >> 8)
    })
}

/// The Adler-32 checksum (RFC 1950) of `data`.
fn adler32(data: &[u8]) -> u32 {
    const MOD: u32 = 65_521;
    // 5552 bytes is the most that can be summed before `b` could overflow a u32.
    const RUN: usize = 5_552;
    let (mut a, mut b) = (1u32, 0u32);
    for run in data.chunks(RUN) {
        for &byte in run {
            a += u32::from(byte);
            b += a;
        }
        a %= MOD;
        b %= MOD;
    }
    (b << 16) | a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crc32(bytes: &[u8]) -> u32 {
        crc32_update(0xFFFF_FFFF, bytes) ^ 0xFFFF_FFFF
    }

    #[test]
    fn checksums_match_reference_values() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
        assert_eq!(adler32(b""), 1);
        // Long enough to wrap the modulus several times.
        let long = vec![0xFFu8; 100_000];
        let (mut a, mut b) = (1u64, 0u64);
        for &byte in &long {
            a = (a + u64::from(byte)) % 65_521;
            b = (b + a) % 65_521;
        }
        assert_eq!(u64::from(adler32(&long)), (b << 16) | a);
    }

    #[test]
    fn stored_blocks_split_at_64k() {
        let data = vec![7u8; STORED_BLOCK + 10];
        let z = zlib_stored(&data);
        assert_eq!(&z[..2], &[0x78, 0x01]);
        assert_eq!(z[2], 0); // not final
        assert_eq!(&z[3..7], &[0xFF, 0xFF, 0x00, 0x00]);
        let second = 2 + 5 + STORED_BLOCK;
        assert_eq!(z[second], 1); // final
        assert_eq!(&z[second + 1..second + 5], &[10, 0, 0xF5, 0xFF]);
        assert_eq!(z.len(), 2 + 5 + STORED_BLOCK + 5 + 10 + 4);
        assert_eq!(
            zlib_stored(&[]),
            vec![0x78, 0x01, 1, 0, 0, 0xFF, 0xFF, 0, 0, 0, 1]
        );
    }

    #[test]
    fn sizes_are_parsed_and_capped() {
        assert_eq!(parse_size("256x128").ok(), Some((256, 128)));
        assert_eq!(parse_size("1024X2048").ok(), Some((MAX_SIDE, MAX_SIDE)));
        assert_eq!(parse_size("auto").ok(), Some((AUTO_SIDE, AUTO_SIDE)));
        for bad in ["", "256", "0x10", "ax1", "10x", "-1x5"] {
            assert!(
                matches!(parse_size(bad), Err(AiError::Rejected(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn images_depend_on_prompt_and_index() {
        let a = render("a cat", 0, 16, 8);
        assert_eq!(a, render("a cat", 0, 16, 8));
        assert_ne!(a, render("a dog", 0, 16, 8));
        assert_ne!(a, render("a cat", 1, 16, 8));
        assert_eq!(&a[..8], &PNG_SIGNATURE);
    }
}
