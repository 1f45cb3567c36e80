// SPDX-License-Identifier: MIT
// slither-disable-next-line pragma: OpenZeppelin's files keep their own, wider ranges
pragma solidity ^0.8.30;

/**
 * @dev An append-only log of every access to customers' data, checked against their consent.
 *
 * An access request names the partner the data is for, the purpose and the request id; each of its
 * entries names a pseudonymous subject and the attribute bits accessed. The contract asks the
 * consent registry, in the same transaction, whether each subject permits exactly that; a permitted
 * entry is an access that may be released, a refused one is kept as a denied attempt so that
 * auditors see those too.
 *
 * Every entry, permitted or not, extends a running hash chain:
 * `head' = keccak256(abi.encode(head, index, subject, partner, purpose, attributes, requestId, permitted))`,
 * starting from zero. With the head and the count readable here, a copy of the log that dropped,
 * re-ordered or altered an entry no longer hashes to the head.
 *
 * One event per recorded batch holds all its entries (not one event per entry): a batch of
 * thousands of entries is one log, a fraction of the size of thousands of logs for the node to
 * keep and for the accessor to read back.
 */
interface IAccessLog {
    /// @dev One subject's data accessed within a request. No personal data: `subject` is a keyed hash.
    struct Entry {
        bytes32 subject;
        uint256 attributes;
    }

    /// @dev The admin, the accessor and the registry must be real accounts.
    error AccessLogZeroAddress();

    /// @dev A batch must hold at least one entry.
    error AccessLogEmptyBatch();

    /**
     * @dev Entries `firstIndex` to `firstIndex + entries.length - 1` (0-based, over the whole log) were
     * recorded for `partner`, `purpose` and `requestId`. `denied` is a bitmap of the entries the
     * registry refused at this block (entry `i` of the batch: bit `i % 8` of byte `i / 8`).
     * `previousHead` is the hash chain's head before the first of them, `head` after the last.
     */
    event AccessBatchRecorded(
        uint256 indexed firstIndex,
        address indexed partner,
        bytes32 indexed purpose,
        bytes32 requestId,
        bytes32 previousHead,
        bytes32 head,
        Entry[] entries,
        bytes denied
    );

    /**
     * @dev Records `entries` of one access request in order, each checked against the registry on
     * its own; returns how many were permitted.
     *
     * Requirements:
     * - the caller has the accessor role;
     * - `entries` is not empty.
     */
    function record(address partner, bytes32 purpose, bytes32 requestId, Entry[] calldata entries)
        external
        returns (uint256 permitted);

    /// @dev The hash chain's head after the last entry (zero while the log is empty).
    function head() external view returns (bytes32);

    /// @dev How many entries the log holds, permitted and denied.
    function count() external view returns (uint256);

    /// @dev The consent registry entries are checked against.
    function registry() external view returns (address);
}
