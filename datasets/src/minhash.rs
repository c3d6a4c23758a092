//! Near-duplicate detection: MinHash signatures of word shingles and locality-sensitive hashing.
//!
//! Exact dedup (ids are content hashes) misses the same paragraph pasted into two notes with a word
//! changed, or a file copied with its header edited. Here each text becomes the set of its 5-word
//! shingles (lowercased words, punctuation and whitespace ignored, so reformatting does not matter), and
//! a signature of 128 entries whose share of equal entries between two texts estimates the Jaccard
//! similarity of their sets. The signature is one-permutation hashing with optimal densification (Li,
//! Owen and Zhang 2012; Shrivastava 2017): each shingle's 64-bit hash picks one of 128 bins by its top
//! bits and the bin keeps the smallest low half; an empty bin (short texts) copies the bin that a fixed
//! hash sequence of its index reaches first. That costs one hash per shingle instead of 128, with the
//! same estimate: the ingest of a large tree spends its time elsewhere. LSH cuts the
//! signature into 16 bands of 8 rows: texts that agree on a whole band become candidates (pairs at
//! Jaccard 0.8 do so with probability 1 − (1 − 0.8⁸)¹⁶ ≈ 0.94), and a candidate counts as a duplicate only
//! when its estimated similarity reaches the threshold. As in datatrove and text-dedup.
//!
//! Hashes are fixed functions of the text (no per-run randomness), so signatures can be stored with the
//! dataset and compared across days.

pub const PERMUTATIONS: usize = 128;
const BANDS: usize = 16;
const ROWS: usize = PERMUTATIONS / BANDS;
/// Changing it (or the shingle hashing) invalidates stored signatures: rename the store's column.
const DENSIFY_SEED: u64 = 0x5041_495F_4F50_4801;
/// Words per shingle.
pub const SHINGLE_WORDS: usize = 5;

/// 128 minimum hashes, each kept to its low 16 bits (b-bit MinHash: two different minima agree by
/// chance once in 65,536, which raises a similarity estimate by under 0.002%, and the stored column is
/// half the size: it was the largest thing ingest wrote after the text); `SIGNATURE_BYTES`
/// little-endian bytes when stored.
#[derive(Clone, PartialEq, Eq)]
pub struct Signature(pub [u16; PERMUTATIONS]);

pub const SIGNATURE_BYTES: usize = PERMUTATIONS * 2;

impl std::fmt::Debug for Signature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signature({:04x}…)", self.0[0])
    }
}

/// The next value of a splitmix64 stream (also the deterministic draws of FIM cuts, mixes and training).
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    mix64(*state)
}

/// splitmix64's finalizer: every input bit moves every output bit.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Each byte lowercased (ASCII) when it belongs to a word, 0 when it does not: words are runs of
/// alphanumeric characters, `_`, and any non-ASCII byte (so words in other scripts count too).
const WORD_BYTES: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = if c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80 {
            c.to_ascii_lowercase()
        } else {
            0
        };
        b += 1;
    }
    t
};

const WORD_SEED: u64 = 0x5041_495F_574F_5244;
const ONES: u64 = 0x0101_0101_0101_0101;

/// Hashes of the words of `text`, lowercased. Word bytes are found 64 at a time as a bit mask
/// (`word_mask`), so the scan does not branch on every byte; each word's bytes are read eight at a time
/// into little-endian lanes (the last one zero-padded), each full lane multiplied into the state, and
/// the state, the last lane and the length mixed once at the end. About 1.6× the speed of a scan a byte
/// at a time with FNV, and this runs over every byte ingested.
pub fn word_hashes(text: &str) -> Vec<u64> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len() / 5);
    // Where the word being read began (it may go on into the next block).
    let mut open: Option<usize> = None;
    for (index, block) in bytes.chunks(64).enumerate() {
        let (base, len, mask) = (index * 64, block.len() as u32, word_mask(block));
        let mut pos = 0u32;
        while pos < len {
            match open {
                Some(start) => {
                    let run = (!(mask >> pos)).trailing_zeros();
                    if pos + run >= len {
                        break;
                    }
                    out.push(word_hash(bytes, start, base + (pos + run) as usize));
                    open = None;
                    pos += run;
                }
                None => {
                    let rest = mask >> pos;
                    if rest == 0 {
                        break;
                    }
                    pos += rest.trailing_zeros();
                    open = Some(base + pos as usize);
                }
            }
        }
    }
    if let Some(start) = open {
        out.push(word_hash(bytes, start, bytes.len()));
    }
    out
}

/// Bit `i` set when `block[i]` (at most 64 bytes) belongs to a word.
#[inline]
fn word_mask(block: &[u8]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if let Ok(block) = <&[u8; 64]>::try_from(block) {
        return sse2_word_mask(block);
    }
    block.iter().enumerate().fold(0, |m, (i, &b)| {
        m | u64::from(WORD_BYTES[usize::from(b)] != 0) << i
    })
}

/// `word_mask` of 64 bytes, sixteen at a time: a byte belongs to a word when it is a letter (either
/// case), a digit, `_`, or not ASCII. SSE2 has only signed byte comparisons, so each range test adds a
/// bias that moves the range to the bottom of the signed bytes.
#[cfg(target_arch = "x86_64")]
#[inline]
fn sse2_word_mask(block: &[u8; 64]) -> u64 {
    use std::arch::x86_64::*;
    let below = |v: __m128i, first: u8, count: i32| {
        // SAFETY: SSE2 is part of the x86_64 baseline; these are register operations.
        unsafe {
            let biased = _mm_add_epi8(v, _mm_set1_epi8((128 - i32::from(first)) as i8));
            _mm_cmplt_epi8(biased, _mm_set1_epi8((-128 + count) as i8))
        }
    };
    let mut mask = 0u64;
    for (k, part) in block.chunks_exact(16).enumerate() {
        // SAFETY: SSE2 is part of the x86_64 baseline; the load is unaligned and reads the 16 bytes
        // of `part`.
        let bits = unsafe {
            let v = _mm_loadu_si128(part.as_ptr().cast());
            let letter = below(_mm_or_si128(v, _mm_set1_epi8(0x20)), b'a', 26);
            let digit = below(v, b'0', 10);
            let underscore = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'_' as i8));
            let not_ascii = _mm_cmplt_epi8(v, _mm_setzero_si128());
            let word = _mm_or_si128(
                _mm_or_si128(letter, digit),
                _mm_or_si128(underscore, not_ascii),
            );
            _mm_movemask_epi8(word) as u32
        };
        mask |= u64::from(bits) << (16 * k);
    }
    mask
}

/// The hash of the word `bytes[start..end]`.
#[inline]
fn word_hash(bytes: &[u8], start: usize, end: usize) -> u64 {
    let mut state = WORD_SEED;
    let mut at = start;
    while at + 8 <= end {
        state = (state ^ lowercase_lane(lane_at(bytes, at)))
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(31);
        at += 8;
    }
    let rest = end - at;
    let last = if rest == 0 {
        0
    } else if at + 8 <= bytes.len() {
        lane_at(bytes, at) & (u64::MAX >> (64 - 8 * rest))
    } else {
        let mut lane = [0u8; 8];
        lane[..rest].copy_from_slice(&bytes[at..end]);
        u64::from_le_bytes(lane)
    };
    // The length in the top byte: a short word's lane leaves it free.
    mix64(state ^ lowercase_lane(last) ^ ((end - start) as u64).rotate_right(8))
}

/// The eight bytes at `at`, little-endian.
#[inline]
fn lane_at(bytes: &[u8], at: usize) -> u64 {
    let mut lane = [0u8; 8];
    lane.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(lane)
}

/// ASCII `A`–`Z` to lowercase in all eight bytes at once; other bytes (non-ASCII ones included)
/// unchanged. Works on the low seven bits so that no addition carries into the next byte.
#[inline]
fn lowercase_lane(x: u64) -> u64 {
    let low = x & (0x7F * ONES);
    let from_a = low + (0x80 - u64::from(b'A')) * ONES;
    let past_z = low + (0x80 - u64::from(b'Z') - 1) * ONES;
    let upper = from_a & !past_z & !x & (0x80 * ONES);
    x | upper >> 2
}

/// 64-bit hashes of the `n`-word shingles of a list of word hashes (one shingle of all the words when
/// there are fewer than `n`, none when there are none): `mix64(n ^ w[0] ^ rotl(w[1], 13) ^ … ^ rotl(w[n-1], 13(n-1)))`. The
/// words' hashes are well mixed, so rotating each by its place keeps the order, and the next window
/// follows from the last by one rotation: no chain of multiplies per shingle.
pub fn shingles(words: &[u64], n: usize) -> impl Iterator<Item = u64> + '_ {
    let n = n.clamp(1, words.len().max(1));
    let lead = (13 * (n - 1)) as u32;
    let mut x = words
        .iter()
        .take(n)
        .enumerate()
        .fold(0u64, |x, (i, &h)| x ^ h.rotate_left(13 * i as u32));
    let windows = if words.is_empty() {
        0
    } else {
        words.len() + 1 - n
    };
    (0..windows).map(move |j| {
        if j > 0 {
            x = (x ^ words[j - 1]).rotate_right(13) ^ words[j + n - 1].rotate_left(lead);
        }
        mix64(x ^ n as u64)
    })
}

impl Signature {
    /// The signature of a text, or `None` when it has fewer words than one shingle (such texts are
    /// left to exact dedup).
    pub fn of(text: &str) -> Option<Self> {
        let words = word_hashes(text);
        if words.len() < SHINGLE_WORDS {
            return None;
        }
        let mut min = [u32::MAX; PERMUTATIONS];
        let mut filled = [false; PERMUTATIONS];
        for s in shingles(&words, SHINGLE_WORDS) {
            let bin = (s >> (64 - PERMUTATIONS.trailing_zeros())) as usize;
            min[bin] = min[bin].min(s as u32);
            filled[bin] = true;
        }
        // Optimal densification: bin i, if empty, takes the value of the first filled bin along a
        // sequence that depends on i alone, so two texts' empty bins look in the same places.
        let donors = min;
        for bin in 0..PERMUTATIONS {
            if filled[bin] {
                continue;
            }
            let mut state = DENSIFY_SEED ^ bin as u64;
            let donor = (0..PERMUTATIONS * 64)
                .map(|_| (splitmix64(&mut state) % PERMUTATIONS as u64) as usize)
                .find(|&j| filled[j])
                // Never reached with a filled bin somewhere (128·64 draws), but deterministic anyway.
                .or_else(|| {
                    (1..PERMUTATIONS)
                        .map(|k| (bin + k) % PERMUTATIONS)
                        .find(|&j| filled[j])
                })
                .unwrap_or(bin);
            min[bin] = donors[donor];
        }
        Some(Signature(min.map(|m| m as u16)))
    }

    /// The estimated Jaccard similarity of the two shingle sets.
    pub fn similarity(&self, other: &Signature) -> f64 {
        let same = self.0.iter().zip(&other.0).filter(|(a, b)| a == b).count();
        same as f64 / PERMUTATIONS as f64
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// `None` unless `bytes` is exactly one stored signature.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != SIGNATURE_BYTES {
            return None;
        }
        let mut out = [0u16; PERMUTATIONS];
        for (v, chunk) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            *v = u16::from_le_bytes([chunk[0], chunk[1]]);
        }
        Some(Signature(out))
    }

    /// One key per band: a hash of the band's rows, its low bits the band's number (so keys of two
    /// bands never collide).
    fn band_keys(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.0.chunks_exact(ROWS).enumerate().map(|(band, rows)| {
            let mut state = band as u64;
            for &r in rows {
                state = (state ^ u64::from(r)).wrapping_mul(0x0000_0100_0000_01b3);
            }
            let key = splitmix64(&mut state) & !BAND_MASK;
            (band, key | band as u64)
        })
    }
}

const BAND_MASK: u64 = (BANDS as u64).next_power_of_two() - 1;
const NONE: u32 = u32::MAX;

/// An LSH index over signatures: which stored texts a new one nearly duplicates. Each bucket is a
/// chain through the entries (the newest in `buckets`, each entry's predecessor per band in `chain`),
/// so an insert allocates nothing per band.
pub struct NearDupIndex<K> {
    threshold: f64,
    buckets: hashbrown::HashMap<u64, u32>,
    chain: Vec<[u32; BANDS]>,
    entries: Vec<(K, Signature)>,
}

impl<K: Clone> NearDupIndex<K> {
    /// `threshold`: the estimated Jaccard similarity from which two texts are duplicates.
    pub fn new(threshold: f64) -> Self {
        Self {
            threshold,
            buckets: hashbrown::HashMap::new(),
            chain: Vec::new(),
            entries: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn insert(&mut self, key: K, signature: Signature) {
        let at = self.entries.len() as u32;
        let mut previous = [NONE; BANDS];
        for (band, k) in signature.band_keys() {
            previous[band] = self.buckets.insert(k, at).unwrap_or(NONE);
        }
        self.chain.push(previous);
        self.entries.push((key, signature));
    }

    /// The most similar stored text at or above the threshold, with its similarity.
    pub fn find(&self, signature: &Signature) -> Option<(K, f64)> {
        let mut best: Option<(usize, f64)> = None;
        let mut compared: hashbrown::HashSet<u32> = hashbrown::HashSet::new();
        for (band, k) in signature.band_keys() {
            let mut at = self.buckets.get(&k).copied().unwrap_or(NONE);
            while at != NONE {
                if compared.insert(at) {
                    let s = self.entries[at as usize].1.similarity(signature);
                    if s >= self.threshold && best.is_none_or(|(_, b)| s > b) {
                        best = Some((at as usize, s));
                    }
                }
                at = self.chain[at as usize][band];
            }
        }
        best.map(|(at, s)| (self.entries[at].0.clone(), s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The word hash as specified, a byte at a time.
    fn word_hashes_by_bytes(text: &str) -> Vec<u64> {
        let mut out = Vec::new();
        let mut word: Vec<u8> = Vec::new();
        for &c in text.as_bytes().iter().chain([&b' ']) {
            let v = WORD_BYTES[usize::from(c)];
            if v != 0 {
                word.push(v);
                continue;
            }
            if word.is_empty() {
                continue;
            }
            let mut state = WORD_SEED;
            let chunks = word.chunks(8).collect::<Vec<_>>();
            let (last, full) = if word.len().is_multiple_of(8) {
                (&[][..], &chunks[..])
            } else {
                (chunks[chunks.len() - 1], &chunks[..chunks.len() - 1])
            };
            for c in full {
                let lane = u64::from_le_bytes((*c).try_into().unwrap());
                state = (state ^ lane)
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    .rotate_left(31);
            }
            let mut lane = [0u8; 8];
            lane[..last.len()].copy_from_slice(last);
            let len = word.len() as u64;
            out.push(mix64(
                state ^ u64::from_le_bytes(lane) ^ len.rotate_right(8),
            ));
            word.clear();
        }
        out
    }

    #[test]
    fn word_hashes_follow_their_byte_at_a_time_definition() {
        let mut state = 5;
        let alphabet: Vec<char> = "aZ9_ .,\n-é日AQz0'\u{80}".chars().collect();
        for _ in 0..20_000 {
            let len = (splitmix64(&mut state) % 40) as usize;
            let text: String = (0..len)
                .map(|_| alphabet[(splitmix64(&mut state) % alphabet.len() as u64) as usize])
                .collect();
            assert_eq!(word_hashes(&text), word_hashes_by_bytes(&text), "{text:?}");
        }
        // Long texts: words across the 64-byte blocks, and the SSE2 mask against the table.
        for _ in 0..300 {
            let len = (splitmix64(&mut state) % 700) as usize;
            let text: String = (0..len)
                .map(|_| alphabet[(splitmix64(&mut state) % alphabet.len() as u64) as usize])
                .collect();
            assert_eq!(word_hashes(&text), word_hashes_by_bytes(&text), "{text:?}");
        }
        for _ in 0..2000 {
            let block: Vec<u8> = (0..64).map(|_| splitmix64(&mut state) as u8).collect();
            let by_table = block.iter().enumerate().fold(0u64, |m, (i, &b)| {
                m | u64::from(WORD_BYTES[usize::from(b)] != 0) << i
            });
            assert_eq!(word_mask(&block), by_table, "{block:?}");
        }
        // Every byte's lowercase, in every position of a lane.
        for b in 0..=255u8 {
            for at in 0..8 {
                let lane = u64::from(b) << (8 * at);
                let want = u64::from(b.to_ascii_lowercase()) << (8 * at);
                assert_eq!(
                    lowercase_lane(lane | 0x8080_8080_8080_8080 & !(0xFF << (8 * at)))
                        & (0xFF << (8 * at)),
                    want
                );
            }
        }
    }

    #[test]
    fn rolling_shingles_equal_their_definition() {
        let mut state = 9;
        for len in 0..40 {
            let words: Vec<u64> = (0..len).map(|_| splitmix64(&mut state)).collect();
            for n in [1, 5, 8] {
                let m = n.clamp(1, len.max(1));
                let want: Vec<u64> = words
                    .windows(m)
                    .map(|w| {
                        let x = w
                            .iter()
                            .enumerate()
                            .fold(m as u64, |x, (i, &h)| x ^ h.rotate_left(13 * i as u32));
                        mix64(x)
                    })
                    .collect();
                assert_eq!(shingles(&words, n).collect::<Vec<_>>(), want, "{len} {n}");
            }
        }
    }

    #[test]
    fn distinct_words_hash_apart_and_case_does_not_matter() {
        let mut state = 11;
        let mut seen = std::collections::HashMap::new();
        for _ in 0..100_000 {
            // Lengths around the 8-byte lanes, where a packing mistake would collide.
            let len = 1 + (splitmix64(&mut state) % 24) as usize;
            let word: String = (0..len)
                .map(|_| char::from(b'a' + (splitmix64(&mut state) % 26) as u8))
                .collect();
            let h = word_hashes(&word);
            assert_eq!(h.len(), 1);
            if let Some(other) = seen.insert(h[0], word.clone()) {
                assert_eq!(other, word, "two words share a hash");
            }
        }
        // A word and the same eight bytes twice.
        assert_ne!(
            word_hashes("abcdefgh"),
            word_hashes("abcdefghabcdefgh")[..1]
        );
        assert_eq!(word_hashes("Größe_X1 éTé"), word_hashes("größe_x1, éTé!"));
        let sig = Signature::of(&words(7, 200).join(" ")).unwrap();
        assert_eq!(Signature::from_bytes(&sig.to_bytes()), Some(sig));
    }

    fn words(seed: u64, n: usize) -> Vec<String> {
        let mut s = seed;
        (0..n)
            .map(|_| format!("w{}", splitmix64(&mut s) % 5000))
            .collect()
    }

    fn exact_jaccard(a: &str, b: &str) -> f64 {
        use std::collections::HashSet;
        let set = |t: &str| -> HashSet<u64> { shingles(&word_hashes(t), SHINGLE_WORDS).collect() };
        let (x, y) = (set(a), set(b));
        x.intersection(&y).count() as f64 / x.union(&y).count() as f64
    }

    #[test]
    fn the_estimate_follows_the_true_jaccard_similarity() {
        let base = words(1, 400);
        for changed in [0usize, 4, 10, 25, 60, 150] {
            let mut other = base.clone();
            let fresh = words(99 + changed as u64, changed);
            for (k, w) in fresh.into_iter().enumerate() {
                let at = (k * 397) % other.len();
                other[at] = w;
            }
            let (a, b) = (base.join(" "), other.join(" "));
            let (sa, sb) = (Signature::of(&a).unwrap(), Signature::of(&b).unwrap());
            let (est, truth) = (sa.similarity(&sb), exact_jaccard(&a, &b));
            // 128 permutations: standard error sqrt(J(1-J)/128) ≤ 0.045.
            assert!(
                (est - truth).abs() < 0.15,
                "changed {changed}: {est} vs {truth}"
            );
        }
    }

    #[test]
    fn short_texts_are_estimated_as_well_through_densification() {
        // 20–60 shingles fill well under half of the 128 bins.
        for (n, changed) in [(24usize, 2usize), (40, 4), (64, 6), (64, 20)] {
            let base = words(7 + n as u64, n);
            let mut other = base.clone();
            for k in 0..changed {
                other[(k * 7919) % n] = format!("new{k}");
            }
            let (a, b) = (base.join(" "), other.join(" "));
            let (sa, sb) = (Signature::of(&a).unwrap(), Signature::of(&b).unwrap());
            let (est, truth) = (sa.similarity(&sb), exact_jaccard(&a, &b));
            assert!(
                (est - truth).abs() < 0.2,
                "{n} words, {changed} changed: {est} vs {truth}"
            );
        }
    }

    #[test]
    fn formatting_and_case_do_not_matter_and_short_texts_have_none() {
        let a = "fn add(a: i32, b: i32) -> i32 { a + b } // Adds two numbers together";
        let b = "fn  add( a:i32,\n    b:i32 )->i32 {\n    a+b\n}\n// adds TWO numbers together";
        assert_eq!(Signature::of(a), Signature::of(b));
        assert!(Signature::of("only four words here").is_none());
        let s = Signature::of(a).unwrap();
        assert_eq!(Signature::from_bytes(&s.to_bytes()), Some(s));
        assert_eq!(Signature::from_bytes(&[0; 5]), None);
    }

    #[test]
    fn the_index_finds_near_copies_and_not_unrelated_texts() {
        let mut index = NearDupIndex::new(0.8);
        let docs: Vec<String> = (0..200).map(|i| words(i, 300).join(" ")).collect();
        for (i, d) in docs.iter().enumerate() {
            index.insert(i, Signature::of(d).unwrap());
        }
        // One word in a hundred changed: found, and the right one.
        let mut near = words(17, 300);
        for k in (0..300).step_by(100) {
            near[k] = "changed".into();
        }
        let (hit, sim) = index
            .find(&Signature::of(&near.join(" ")).unwrap())
            .unwrap();
        assert_eq!(hit, 17);
        assert!(sim >= 0.8, "{sim}");
        // Half the words changed, or a text never seen: nothing.
        let mut half = words(23, 300);
        for k in (0..300).step_by(2) {
            half[k] = format!("x{k}");
        }
        assert!(index
            .find(&Signature::of(&half.join(" ")).unwrap())
            .is_none());
        assert!(index
            .find(&Signature::of(&words(5000, 300).join(" ")).unwrap())
            .is_none());
    }
}
